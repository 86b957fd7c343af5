import pytest
import torch
from huggingface_hub import is_offline_mode

from lm_gym.models import tiny_causal_lm
from lm_gym.rewards import VaderSentiment
from lm_gym.tasks import Task

PROMPTS = (
    "The film opens on",
    "I expected very little from this sequel, but",
    "A slow",
    "Halfway through the second act, the director decides that the story needs",
    "Critics have been kind to",
)


# The tests run tiny models, whose forward passes are mostly Python: one torch thread is as fast, and a
# shared machine's other load cannot make the OpenMP workers spin against each other.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """The tiny model and tokenizer (random weights, seed 0)."""
    model, tokenizer = tiny_causal_lm(seed=0)
    model.requires_grad_(False)
    return model, tokenizer


@pytest.fixture(scope="session")
def toy_task():
    return Task("toy", PROMPTS, PROMPTS[:2], VaderSentiment)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in the tests may reach the Hugging Face Hub (the flag is also read at import time)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(is_offline_mode.__globals__, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
