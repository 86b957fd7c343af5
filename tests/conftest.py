import os
import sys
import warnings
from pathlib import Path

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


if os.environ.get("LM_GYM_RECORD_TOLERANCES"):  # measuring the tolerances (tests/tolerances.py)
    from tests.tolerances import install

    install(os.environ["LM_GYM_RECORD_TOLERANCES"])

# The tests run tiny models, whose forward passes are mostly Python: one torch thread is as fast, and a
# shared machine's other load cannot make the OpenMP workers spin against each other.
torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="also run the tests marked slow (several processes, subprocesses, the 135M model): docs/testing.md",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave the tests marked ``slow`` out of the default run. They run with ``--run-slow``, when a ``-m``
    expression chooses the tests (``-m slow``: those alone; ``-m learning``: every learning test), and when
    their file is named on the command line: whoever names a file means all of it."""
    if config.getoption("--run-slow") or config.getoption("markexpr"):
        return
    named = {(config.invocation_params.dir / arg.split("::")[0]).resolve() for arg in config.args}
    slow = {item for item in items if item.get_closest_marker("slow") and item.path not in named}
    if slow:
        config.hook.pytest_deselected(items=[item for item in items if item in slow])
        items[:] = [item for item in items if item not in slow]


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


ROOT = Path(__file__).resolve().parents[1]
OUR_CODE = tuple(str(ROOT / folder) for folder in ("lm_gym", "algorithms", "examples", "benchmarks", "tests"))
# Frames that only pass a call through (module __call__, functools wrappers): a deprecation they report belongs
# to whoever called them.
PASS_THROUGH = ("torch/nn/modules/module.py", "functools.py", "contextlib.py")


def _package(filename: str) -> str:
    """The installed package a frame's file belongs to (``transformers``), else the file itself."""
    parts = Path(filename).parts
    return parts[parts.index("site-packages") + 1] if "site-packages" in parts else filename


def _own_caller(frame) -> str | None:
    """``file:line`` of the call a warning is about when lm-gym's own code made it, else None: the first frame,
    walking up from the one that warned, outside the warning package and the pass-through frames."""
    origin = _package(frame.f_code.co_filename)
    while frame is not None and (
        _package(frame.f_code.co_filename) == origin
        or any(part in frame.f_code.co_filename for part in PASS_THROUGH)
    ):
        frame = frame.f_back
    if frame is not None and frame.f_code.co_filename.startswith(OUR_CODE):
        return f"{Path(frame.f_code.co_filename).relative_to(ROOT)}:{frame.f_lineno}"
    return None


@pytest.fixture(autouse=True)
def _no_deprecated_calls_from_our_code(monkeypatch: pytest.MonkeyPatch):
    """A FutureWarning or DeprecationWarning about a call that lm-gym's own code makes fails the test, so the
    next deprecation in a dependency shows up here and not in a user's terminal. The call is the first frame
    above the warning that is outside the package that warned (past frames that only pass a call through); a
    deprecation that one dependency's code triggers in another (peft calling transformers) is theirs, and left
    as a warning."""
    found: list[str] = []
    warn = warnings.warn

    def checked_warn(message, category=None, stacklevel=1, source=None, **kwargs):
        kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(kind, (DeprecationWarning, FutureWarning)):
            caller = _own_caller(sys._getframe(1))
            if caller is not None:
                found.append(f"{caller}: {kind.__name__}: {message}")
        return warn(message, category, stacklevel + 1, source, **kwargs)

    monkeypatch.setattr(warnings, "warn", checked_warn)
    yield
    if found:
        pytest.fail("deprecated calls from lm-gym's code:\n" + "\n".join(dict.fromkeys(found)), pytrace=False)
