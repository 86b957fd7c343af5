"""The documentation runs as written and names only things that exist.

* Every ``python`` block of README.md and docs/*.md runs in a fresh namespace, in a temporary working
  directory, on the tiny test models; a block right after a ``<!-- docs-test: skip (reason) -->`` line is
  not run (it needs a file the reader makes first). The worked examples of docs/extending.md and the README's
  examples are then checked for what the text claims of them.
* Every repository path, pytest node id, ``lm_gym.``/``algorithms.`` dotted name, ``Class.attribute`` of
  our classes, ``lm-gym SUBCOMMAND --flag`` and link between pages (anchors included) resolves.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import inspect
import io
import math
import pkgutil
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = next(
    p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists()
)  # wherever tests/ puts this
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
HEADING = re.compile(r"^(#{1,6}) +(.+?) *$", re.M)
SKIP = "<!-- docs-test: skip"


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(page: Path, language: str) -> list[tuple[int, str, str]]:
    """``(line, heading, code)`` of every block of ``language`` in ``page`` that is not marked skip."""
    text = page.read_text(encoding="utf-8")
    out = []
    for match in FENCE.finditer(text):
        if match.group(1) != language:
            continue
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if before.startswith(SKIP):
            continue
        headings = HEADING.findall(without_code(text[: match.start()]))
        heading = headings[-1][1] if headings else ""
        out.append((text.count("\n", 0, match.start()) + 1, heading, match.group(2)))
    return out


def without_code(text: str) -> str:
    """The page's prose: code blocks blanked out (a ``#`` comment in a block is no heading)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


# ---------------------------------------------------------------------------------------------------------
# the python blocks run, and do what the text says
# ---------------------------------------------------------------------------------------------------------
def finite_losses(history: list[dict[str, float]], keys: tuple[str, ...]) -> None:
    for row in history:
        for key in keys:
            assert math.isfinite(row[key]), f"iteration {row['iteration']}: {key} = {row[key]}"


def weights_moved(policy: torch.nn.Module, initial: torch.nn.Module) -> bool:
    start = dict(initial.named_parameters())
    return any(
        not torch.equal(p.detach().cpu(), start[name].detach()) for name, p in policy.model.named_parameters()
    )


def check_env_example(ns: dict[str, Any]) -> None:
    assert ns["done"], "the episode did not end"
    assert isinstance(ns["info"]["text"], str) and math.isfinite(ns["info"]["score"])


def check_training_example(ns: dict[str, Any]) -> None:
    from lm_gym.models import tiny_causal_lm

    ppo = ns["ppo"]
    assert ppo.iteration == len(ppo.logger.history) > 0
    finite_losses(ppo.logger.history, ("train/policy_loss", "train/value_loss", "rollout/rm_score"))
    assert weights_moved(ppo.policy, tiny_causal_lm(seed=0)[0]), "training left the weights as they were"
    if ppo.run_dir is not None:
        assert (ppo.run_dir / "final" / "config.json").exists()


def check_sampler_example(ns: dict[str, Any]) -> None:
    rewards = ns["rewards"]
    assert rewards.shape == (4,) and all(math.isfinite(r) for r in rewards)
    # the agent's half makes the reward differ from the env's by exactly -kl_coef * log pi
    assert (ns["log_probs"] < 0).all()


def check_algorithm_example(ns: dict[str, Any]) -> None:
    from lm_gym.models import tiny_causal_lm

    algo = ns["algo"]
    assert isinstance(algo, ns["REINFORCE"]) and algo.iteration == 10
    assert [row["iteration"] for row in algo.logger.history] == list(range(1, 11))
    finite_losses(algo.logger.history, ("train/policy_loss", "train/value_loss", "rollout/rm_score"))
    assert weights_moved(algo.policy, tiny_causal_lm(seed=0)[0]), "REINFORCE did not step the weights"


def check_task_example(ns: dict[str, Any]) -> None:
    info, env, topics = ns["info"], ns["env"], ns["topics"]
    # the scripted agent wrote the topic: the task's own reward scored the text 1.0, and the last step's
    # reward is that score plus the reference's half of the KL penalty
    assert ns["topic_of"](info["prompt"]) in info["text"] and info["score"] == 1.0
    assert ns["reward"] == pytest.approx(1.0 + env.unwrapped.kl_coef * info["ref_log_prob"])
    assert info["prompt"] in topics.train_prompts
    ppo = ns["ppo"]
    assert ppo.iteration == 2 and ppo.envs.task is topics
    finite_losses(ppo.logger.history, ("train/policy_loss", "rollout/rm_score"))


def check_reward_example(ns: dict[str, Any]) -> None:
    if "rm" in ns:  # the neural reward model
        assert ns["rm"].texts(["A film"], [" that I loved."]) == ["A film that I loved."]
        (score,) = ns["rm"](["A film"], [" that I loved."])
        assert math.isfinite(score)
        return
    from lm_gym.rewards import LowercaseShare

    reward = ns["reward"]
    text = "Abc de fgh ij kl"  # 5 words: 2 beyond max_words, at 0.1 each
    expected = LowercaseShare()(["p"], [text])[0] - 0.2
    reward.batch_sizes.clear()
    assert reward(["p"], [text])[0] == pytest.approx(expected)
    assert ns["ppo"].iteration == 2


def check_model_family_example(ns: dict[str, Any]) -> None:
    assert ns["model"].config.model_type == "gpt2"
    ppo = ns["ppo"]
    assert ppo.iteration == 2
    finite_losses(ppo.logger.history, ("train/policy_loss", "train/value_loss"))


# (page, heading of the section the block is in) -> what the text claims of the block
CHECKS: dict[tuple[str, str], Callable[[dict[str, Any]], None]] = {
    ("README.md", "Quickstart: the environment"): check_env_example,
    ("README.md", "Quickstart: training"): check_training_example,
    ("docs/training.md", "In Python"): check_training_example,
    ("docs/environment.md", "An agent that pays its half: `CachedSampler`"): check_sampler_example,
    ("docs/extending.md", "An algorithm"): check_algorithm_example,
    ("docs/extending.md", "A task"): check_task_example,
    ("docs/extending.md", "A reward"): check_reward_example,
    ("docs/extending.md", "A model family"): check_model_family_example,
}
PYTHON_BLOCKS = [
    (page, line, heading, code) for page in PAGES for line, heading, code in blocks(page, "python")
]


@pytest.mark.parametrize(
    "page, line, heading, code", PYTHON_BLOCKS, ids=[f"{rel(p)}:{line}" for p, line, _, _ in PYTHON_BLOCKS]
)
def test_python_block_runs(page, line, heading, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a block writes (run folders, models) stays in the test's folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    with torch.random.fork_rng(devices=[]):
        exec(compile(code, f"{rel(page)}:{line}", "exec"), namespace)
    check = CHECKS.get((rel(page), heading))
    if check is not None:
        check(namespace)


def test_every_worked_example_is_checked():
    """Each python block of the README and of docs/extending.md has a check of what it claims, and every
    check finds its block (a renamed heading would otherwise drop it silently)."""
    found = {(rel(page), heading) for page, _, heading, _ in PYTHON_BLOCKS}
    for page in ("README.md", "docs/extending.md"):
        unchecked = sorted(h for p, h in found if p == page and (p, h) not in CHECKS)
        assert not unchecked, f"{page}: python blocks under {unchecked} have no entry in CHECKS"
    assert set(CHECKS) <= found, f"no python block under {sorted(set(CHECKS) - found)}"


def test_readme_examples_are_short():
    """The README is a front door: its examples are about 10 lines each, and it stays about 150-200 lines."""
    readme = ROOT / "README.md"
    for line, heading, code in blocks(readme, "python"):
        assert len(code.strip().splitlines()) <= 12, f"README.md:{line} ({heading}) is longer than 12 lines"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= 210


# ---------------------------------------------------------------------------------------------------------
# everything the pages name exists
# ---------------------------------------------------------------------------------------------------------
REPO_PATH = re.compile(
    r"(?<![\w/.~-])((?:lm_gym|algorithms|tests|benchmarks|examples|docs|scripts|\.ci)/[\w./*-]*)"
)
NODE_ID = re.compile(r"(?<![\w/])((?:tests/)?[\w/]*test_\w+\.py)::([\w*\[\]-]+)")
DOTTED = re.compile(r"(?<![\w/.-])((?:lm_gym|algorithms)(?:\.\w+)+)")
CLASS_ATTR = re.compile(r"(?<![\w.])([A-Z]\w+)\.([a-z_]\w*)")
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
FILE_SUFFIXES = {"md", "py", "png", "csv", "json", "jsonl", "txt", "yaml", "toml", "sh"}


def page_texts() -> list[tuple[Path, str]]:
    return [(page, page.read_text(encoding="utf-8")) for page in PAGES]


def resolve_dotted(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def our_classes() -> dict[str, list[type]]:
    """Every class defined in lm_gym and algorithms, by name, with the classes of stable-baselines3 and
    sb3-contrib of the same name (the pages name SB3's ``PPO.load`` as well as our ``PPO``)."""
    classes: dict[str, list[type]] = {}
    for package in ("lm_gym", "algorithms"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if inspect.isclass(obj) and obj.__module__ == info.name:
                    classes.setdefault(name, []).append(obj)
    for library in ("stable_baselines3", "sb3_contrib"):
        module = importlib.import_module(library)
        for name in classes:
            if inspect.isclass(getattr(module, name, None)):
                classes[name].append(getattr(module, name))
    return classes


def code_fragments(text: str) -> list[str]:
    """The lines of the page's code blocks (a line continued with a backslash joined to the next) and its
    inline code spans: where commands are written."""
    lines = [
        line for match in FENCE.finditer(text) for line in match.group(2).replace("\\\n", " ").splitlines()
    ]
    return lines + SPAN.findall(without_code(text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_repository_paths_exist():
    missing = []
    for page, text in page_texts():
        for match in REPO_PATH.finditer(text):
            path = match.group(1).split("::")[0].rstrip(".")
            if "*" in path:
                if not list(ROOT.glob(path)):
                    missing.append(f"{rel(page)}: {path}")
            elif not (ROOT / path).exists():
                missing.append(f"{rel(page)}: {path}")
    assert not missing, "no such file or folder:\n" + "\n".join(missing)


def test_test_node_ids_exist():
    missing = []
    for page, text in page_texts():
        for match in NODE_ID.finditer(text):
            file, function = match.groups()
            candidates = [ROOT / file] if file.startswith("tests/") else list((ROOT / "tests").rglob(file))
            sources = [c.read_text(encoding="utf-8") for c in candidates if c.exists()]
            names = {n for source in sources for n in re.findall(r"^def (test_\w+)", source, re.M)}
            if not fnmatch.filter(names, function.split("[")[0]):
                missing.append(f"{rel(page)}: {file}::{function}")
    assert not missing, "no such test:\n" + "\n".join(missing)


def test_dotted_names_resolve():
    missing = []
    for page, text in page_texts():
        for match in DOTTED.finditer(text):
            name = match.group(1).rstrip(".")
            if name.rsplit(".", 1)[-1] in FILE_SUFFIXES:
                continue  # a file name such as algorithms.md
            if not resolve_dotted(name):
                missing.append(f"{rel(page)}: {name}")
    assert not missing, "these names do not resolve:\n" + "\n".join(missing)


def test_class_attributes_exist():
    """``Class.attribute`` in backticks, for every class of ours of that name (others' are not checked)."""
    classes = our_classes()
    missing = []
    for page, text in page_texts():
        for span in SPAN.findall(text):
            for cls, attr in CLASS_ATTR.findall(span):
                if cls in classes and not any(hasattr(c, attr) for c in classes[cls]):
                    missing.append(f"{rel(page)}: {cls}.{attr}")
    assert not missing, "no such attribute:\n" + "\n".join(missing)


def cli_help(subcommand: str) -> str | None:
    from algorithms.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main([subcommand, "--help"])
        except SystemExit as exit:
            if exit.code != 0:
                return None
    return out.getvalue()


def test_command_line_flags_exist():
    """Every ``--flag`` after ``lm-gym SUB`` (or ``-m algorithms.cli SUB``) is one of SUB's options."""
    command = re.compile(r"(?:\blm-gym|-m algorithms\.cli) +([a-z][\w-]*)([^`#\n]*)")
    helps: dict[str, str | None] = {}
    wrong = []
    for page, text in page_texts():
        for fragment in code_fragments(text):
            for sub, rest in command.findall(fragment):
                if sub not in helps:
                    helps[sub] = cli_help(sub)
                if helps[sub] is None:
                    wrong.append(f"{rel(page)}: lm-gym {sub} (no such subcommand)")
                    continue
                for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest.split("&&")[0]):
                    if not re.search(rf"{re.escape(flag)}\b(?!-)", helps[sub]):
                        wrong.append(f"{rel(page)}: lm-gym {sub} {flag}")
    assert not wrong, "unknown subcommands or flags:\n" + "\n".join(wrong)


def test_links_and_anchors_resolve():
    broken = []
    anchors = {page: {slug(h) for _, h in HEADING.findall(without_code(text))} for page, text in page_texts()}
    for page, text in page_texts():
        for target in LINK.findall(text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{rel(page)}: {target}")
            elif anchor and (file.suffix != ".md" or anchor not in anchors.get(file, set())):
                broken.append(f"{rel(page)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
