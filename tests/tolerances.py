"""Measure the tolerances of the suite: how far each approximate assertion's two sides really are apart.

Every ``torch.testing.assert_close``, ``np.testing.assert_allclose`` and ``pytest.approx`` comparison in the
tests allows some rounding; the comment beside it says how much was measured. To measure again, run the
suite with recording on under each kernel setting of docs/testing.md, then read the table:

    LM_GYM_RECORD_TOLERANCES=/tmp/tol/default.jsonl python3 -m pytest -q --run-slow tests
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        LM_GYM_RECORD_TOLERANCES=/tmp/tol/avx2.jsonl python3 -m pytest -q --run-slow tests
    python3 -m tests.tolerances /tmp/tol/*.jsonl    # per assertion: the tolerance, the largest difference seen
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent


def _site() -> str | None:
    """``lm_gym/test_env.py:line`` (its path under tests/) of the test code that made the comparison."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if TESTS in path.parents and path.name.startswith("test_"):
            return f"{path.relative_to(TESTS)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def install(out: str) -> None:
    """Record every approximate comparison of the tests into the JSON-lines file ``out`` (appended)."""
    import _pytest.python_api as approx_api
    import torch

    sink = open(out, "a")  # noqa: SIM115 (open for the whole test session)

    def record(kind: str, actual, expected, atol, rtol) -> None:
        site = _site()
        try:
            a = np.asarray(torch.as_tensor(actual).detach().cpu().double(), dtype=np.float64)
            e = np.asarray(torch.as_tensor(expected).detach().cpu().double(), dtype=np.float64)
            a, e = np.broadcast_arrays(a, e)  # assert_allclose(x, 0.0)
            diff = np.abs(a - e)
            finite = np.isfinite(diff)
            worst = float(diff[finite].max()) if finite.any() else 0.0
            rel = float((diff[finite] / np.maximum(np.abs(e[finite]), 1e-300)).max()) if finite.any() else 0.0
        except (TypeError, ValueError, RuntimeError):
            return  # not numbers (pytest.approx of a dict key, a string): nothing to measure
        row = {"site": site, "kind": kind, "abs": worst, "rel": rel, "atol": atol, "rtol": rtol}
        row["cpu"] = torch.backends.cpu.get_cpu_capability()
        sink.write(json.dumps(row) + "\n")
        sink.flush()

    assert_close = torch.testing.assert_close

    def recorded_assert_close(actual, expected, *args, **kwargs):
        if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
            record("assert_close", actual, expected, kwargs.get("atol"), kwargs.get("rtol"))
        return assert_close(actual, expected, *args, **kwargs)

    assert_allclose = np.testing.assert_allclose

    def recorded_assert_allclose(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
        record("assert_allclose", actual, desired, atol, rtol)
        return assert_allclose(actual, desired, rtol, atol, *args, **kwargs)

    scalar_eq = approx_api.ApproxScalar.__eq__

    def recorded_eq(self, actual) -> bool:
        if isinstance(actual, (int, float, np.number)) and isinstance(self.expected, (int, float, np.number)):
            record("approx", float(actual), float(self.expected), self.abs, self.rel)
        return scalar_eq(self, actual)

    torch.testing.assert_close = recorded_assert_close
    np.testing.assert_allclose = recorded_assert_allclose
    approx_api.ApproxScalar.__eq__ = recorded_eq


def main(paths: list[str]) -> None:
    """Print, per assertion site, its tolerance and the largest absolute and relative difference recorded."""
    sites: dict[str, dict] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            if row["site"] is None:
                continue
            seen = sites.setdefault(row["site"], {"abs": 0.0, "rel": 0.0, "n": 0, "cpus": set(), **row})
            seen["abs"], seen["rel"] = max(seen["abs"], row["abs"]), max(seen["rel"], row["rel"])
            seen["n"] += 1
            seen["cpus"].add(Path(path).stem)
    for site in sorted(sites, key=lambda s: (s.split(":")[0], int(s.split(":")[1]))):
        s = sites[site]
        print(
            f"{site:<44} {s['kind']:<16} atol {s['atol']!s:<8} rtol {s['rtol']!s:<8} "
            f"max abs {s['abs']:.1e} max rel {s['rel']:.1e} ({s['n']} comparisons; {','.join(sorted(s['cpus']))})"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
