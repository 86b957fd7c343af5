"""The trainer skeleton shared by the RL core, SFT and reward-model training (algorithms/common/trainer.py)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from algorithms.common.distributed import ProcessGroup
from algorithms.common.nonfinite import NonFiniteLossError
from algorithms.common.trainer import Trainer, check_arg, schedule_factor
from algorithms.sft import SFT, Demonstration
from lm_gym.models import tiny_causal_lm


def _trainer(*values: float, **kwargs) -> tuple[Trainer, torch.nn.Parameter]:
    w = torch.nn.Parameter(torch.tensor(values or (1.0, 2.0)))
    return Trainer([w], ProcessGroup(), **{"learning_rate": 0.1, **kwargs}), w


def test_the_linear_schedule_is_transformers_without_warmup_and_learns_from_the_first_warmup_step():
    w = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([w], lr=1.0)
    hf = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=7)
    for step in range(7):
        assert schedule_factor(step, 7, "linear") == hf.get_last_lr()[0]
        optimizer.step()
        hf.step()
    assert [schedule_factor(s, 10, "linear", warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert schedule_factor(9, 10, "linear", warmup_steps=4) == pytest.approx(1 / 6)
    assert [schedule_factor(s, 10, "constant", warmup_steps=2) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]


def test_a_non_finite_step_changes_nothing_and_the_guard_stops_the_run():
    trainer, w = _trainer(max_nonfinite=2)
    (w.sum() * math.nan).backward()
    assert trainer.step(finite=True) is None  # the gradient is NaN: skipped
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0])) and w.grad is None
    with pytest.warns(RuntimeWarning, match="step 1: skipped 1 update"):
        assert not trainer.guard.end_round(1, "step 1")
    w.sum().backward()
    assert trainer.step() is not None and not torch.equal(w.detach(), torch.tensor([1.0, 2.0]))
    assert not trainer.guard.end_round(0, "step 2") and trainer.guard.streak == 0
    with pytest.warns(RuntimeWarning):
        trainer.guard.end_round(1, "step 3")
        assert trainer.guard.end_round(1, "step 4")
    assert isinstance(trainer.guard.error("kept"), NonFiniteLossError)


def test_bf16_parameters_are_stepped_through_float32_masters():
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    trainer = Trainer([w], ProcessGroup(), learning_rate=1e-5)
    for _ in range(3):
        w.float().sum().backward()
        trainer.step()
    master = trainer.masters.master(w)
    assert master.dtype == torch.float32 and bool((master < 1).all())  # AdamW moved it by ~3e-5
    assert torch.equal(w.detach(), master.detach().to(torch.bfloat16))  # the bf16 weight is its rounding
    with pytest.raises(ValueError, match="float16 weights cannot be trained"):
        Trainer([torch.nn.Parameter(torch.ones(2, dtype=torch.float16))], ProcessGroup(), learning_rate=1e-3)


def test_a_checkpoint_restores_weights_optimizer_guard_and_rng_and_refuses_other_settings(tmp_path):
    trainer, w = _trainer()
    w.sum().backward()
    trainer.step()
    trainer.guard.streak = 1
    torch.manual_seed(7)
    settings = {"learning_rate": 0.1, "data": "abc"}
    trainer.save(tmp_path, "step_000001", {"w": w}, {"step": 1, "settings": settings}, keep=1)
    expected_draw = torch.rand(3)

    resumed, w2 = _trainer(5.0, 5.0)
    checkpoint, state = Trainer.resume_point(tmp_path, settings, "test")
    assert state["step"] == 1 and state["nonfinite_streak"] == 1
    resumed.load(checkpoint, {"w": w2})
    assert torch.equal(w2.detach(), w.detach()) and resumed.guard.streak == 1
    assert torch.equal(torch.rand(3), expected_draw)
    for a, b in zip(
        resumed.optimizer.state_dict()["state"][0].values(),
        trainer.optimizer.state_dict()["state"][0].values(),
    ):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    with pytest.raises(ValueError, match="was run with data='abc', now 'xyz'"):
        Trainer.resume_point(tmp_path, {**settings, "data": "xyz"}, "test")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        Trainer.resume_point(tmp_path / "empty", settings, "test")
    with pytest.raises(ValueError, match="test: resume needs checkpoint_dir"):
        Trainer.resume_point(None, settings, "test")
    with pytest.raises(ValueError, match="does not fit this model"):
        resumed.load(checkpoint, {"v": w2})


def test_check_arg_names_the_argument_what_is_allowed_and_the_value():
    check_arg("epochs", 2, lambda v: v >= 1, "an integer >= 1")
    with pytest.raises(ValueError, match=r"^epochs must be an integer >= 1; got 0$"):
        check_arg("epochs", 0, lambda v: v >= 1, "an integer >= 1")
    with pytest.raises(ValueError, match="got 'two'"):
        check_arg("epochs", "two", lambda v: v >= 1, "an integer >= 1")


def test_sft_in_bf16_trains_through_the_skeletons_masters():
    """SFT shares the RL core's precision: a bf16 model's update is not rounded away."""
    model, tokenizer = tiny_causal_lm(seed=0)
    model.to(torch.bfloat16)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    demos = [Demonstration("", "abc abc abc")] * 4
    result = SFT(model, tokenizer, epochs=1, batch_size=2, learning_rate=1e-4, verbose=0).learn(demos)
    assert result.metrics["train/steps"] == 2 and math.isfinite(result.metrics["train/loss"])
    changed = sum(not torch.equal(p.detach(), before[k]) for k, p in model.named_parameters())
    assert model.dtype == torch.bfloat16 and changed > len(before) // 2
