"""The layout shows the architecture: lm_gym (the environment side) -> nothing of ours; algorithms -> lm_gym;
benchmarks and examples -> both. No import runs back up, and no private name crosses a module boundary."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what each package may import of ours
ALLOWED = {"lm_gym": {"lm_gym"}, "algorithms": {"lm_gym", "algorithms"}}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, relative imports resolved to absolute ones."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_runs_back_up_the_layers(package):
    wrong = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for module, _ in _imports(path)
        if module.split(".")[0] in {"lm_gym", "algorithms", "benchmarks", "examples", "tests"}
        and module.split(".")[0] not in ALLOWED[package]
    ]
    assert not wrong, wrong


def test_no_private_name_is_imported_across_modules():
    wrong = [
        f"{path.relative_to(ROOT)}: from {module} import {name}"
        for package in ("lm_gym", "algorithms", "benchmarks", "examples")
        for path in sorted((ROOT / package).rglob("*.py"))
        for module, names in _imports(path)
        if module.split(".")[0] in ALLOWED
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not wrong, wrong


def test_the_environment_side_imports_without_any_algorithm():
    """Importing every lm_gym module (the env, the tasks, rewards, preferences...) loads nothing of algorithms/."""
    code = (
        "import pkgutil, importlib, sys, lm_gym\n"
        "for m in pkgutil.walk_packages(lm_gym.__path__, 'lm_gym.'): importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'algorithms'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
