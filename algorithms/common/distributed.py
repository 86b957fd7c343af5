"""Data parallelism for the on-policy core: :mod:`lm_gym.distributed`, re-exported (``ProcessGroup`` lives in
``lm_gym`` so that the reward-model training there can use it without ``algorithms``)."""

from lm_gym.distributed import BUCKET_ELEMENTS, ProcessGroup, is_main_process, process_device

__all__ = ["BUCKET_ELEMENTS", "ProcessGroup", "is_main_process", "process_device"]
