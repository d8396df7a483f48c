"""The README's commands work when followed: the Python quick start runs against a synthetic checkpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from qwenkit.checkpoints.synthetic import make_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {name}:start -->\s*```\w*\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert match, f"README.md has no {name} block"
    return match.group(1)


def test_quick_start_runs(tmp_path):
    demo = make_checkpoint(tmp_path / "demo", preset="tiny", dtype="float32")
    # Short answers keep the test fast; the code runs as written, with the demo directory as the model.
    config = demo / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_new_tokens": 8}))
    code = _block("readme-python").replace('"Qwen/Qwen-1_8B-Chat"', repr(str(demo)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) >= 5


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "test-command:start" in ci and "pytest" in _block("test-command")
