"""`qwenkit bench` smoke test on a tiny synthetic checkpoint (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

from qwenkit.checkpoints.synthetic import make_checkpoint


def test_bench_prints_the_card_tables_and_json(tmp_path):
    demo = make_checkpoint(tmp_path / "demo", preset="tiny", dtype="float32")
    out_json = tmp_path / "bench.json"
    out = subprocess.run(
        [sys.executable, "-m", "qwenkit", "bench", "-m", str(demo), "--dtype", "float32", "--gen", "4",
         "--prompt-len", "8", "--runs", "2", "--threads", "1", "--json", str(out_json)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Speed, generating 4 tokens" in out.stdout and "encoding 2048 tokens" in out.stdout
    data = json.loads(out_json.read_text())
    assert len(data["decode_tok_s"]) == 2 and all(v > 0 for v in data["decode_tok_s"])
    assert data["prefill_median"] > 0 and data["threads"] == 1
    assert 0 < data["peak_encode_gb"] < 10 and 0 < data["peak_generate_gb"] < 10


def test_bench_rejects_bad_arguments(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "qwenkit", "bench", "-m", str(tmp_path), "--gen", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "positive" in out.stderr


def test_bench_quantized(tmp_path):
    demo = make_checkpoint(tmp_path / "demo", preset="tiny", dtype="float32")
    out = subprocess.run(
        [sys.executable, "-m", "qwenkit", "bench", "-m", str(demo), "--dtype", "float32", "--quantize", "int4",
         "--gen", "3", "--prompt-len", "8", "--runs", "1", "--no-memory"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "float32 + int4" in out.stdout
