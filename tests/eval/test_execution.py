"""HumanEval execution: a correct, a wrong, a hanging and a crashing completion give pass/fail/fail/fail, in time."""

from __future__ import annotations

import os
import time

import pytest

from qwenkit.eval.execution import run_program
from qwenkit.eval.humaneval import check_program

PROBLEM = {
    "prompt": 'def add(a, b):\n    """Add."""\n',
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
}


@pytest.mark.parametrize(
    ("completion", "passed", "result"),
    [
        ("    return a + b\n", True, "passed"),
        ("    return a - b\n", False, "failed: AssertionError"),
        ("    while True:\n        pass\n", False, "timed out"),
        ("    import os\n    os.abort()\n", False, "failed: killed by SIGABRT"),
        ("    raise SystemExit(0)\n", False, "failed"),  # exiting "successfully" early is no pass
        ("    return [0] * (10 ** 10)\n", False, "failed: MemoryError"),  # the address-space rlimit
    ],
)
def test_outcomes(completion: str, passed: bool, result: str) -> None:
    start = time.perf_counter()
    outcome = run_program(check_program(PROBLEM, completion), timeout=2.0)
    assert time.perf_counter() - start < 6
    assert outcome.passed is passed
    assert outcome.result.startswith(result)


def test_no_inherited_secrets_and_temp_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "secret-value")
    body = (
        "    import os\n    assert 'OPENAI_API_KEY' not in os.environ\n"
        f"    assert os.getcwd() != {os.getcwd()!r} and 'qwenkit-exec-' in os.getcwd()\n    return a + b\n"
    )
    assert run_program(check_program(PROBLEM, body), timeout=3.0).passed


def test_children_left_behind_are_killed(tmp_path) -> None:
    marker = tmp_path / "alive"
    child = f"import time; time.sleep(2); open({str(marker)!r}, 'w')"
    body = f"    import subprocess, sys\n    subprocess.Popen([sys.executable, '-c', {child!r}])\n    return a + b\n"
    assert run_program(check_program(PROBLEM, body), timeout=3.0).passed
    time.sleep(2.5)
    assert not marker.exists()
