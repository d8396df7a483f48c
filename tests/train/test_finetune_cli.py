"""`qwenkit finetune` and `qwenkit merge-lora` end to end on the tiny random checkpoint: the adapter loads in
`load(lora=)`, `generate --lora` / `chat --lora` and as a merged checkpoint, Ctrl-C saves a checkpoint that
--resume continues, a 2-process torchrun run saves one adapter, and bad input is one error line with status 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwenkit.checkpoints.adapter_files import read_adapter
from qwenkit.checkpoints.loading import load
from qwenkit.checkpoints.lora import LoraSpec, add_lora, route_frozen_linears
from qwenkit.checkpoints.synthetic import make_checkpoint
from qwenkit.cli import main
from qwenkit.train.state import STATE_FILE

QWENKIT = [sys.executable, "-m", "qwenkit"]
# Small and fast: the tiny preset still has the full 151,936-token vocabulary, so logits are wide.
FAST = ["--lora-r", "4", "--max-len", "32", "--batch-size", "2", "--grad-accum", "1", "--lr", "2e-2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ftcli") / "tiny", preset="tiny", dtype="float32")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    records = [
        {"id": f"c{i}", "conversations": [{"from": "user", "value": f"question {i}"},
                                          {"from": "assistant", "value": "answer " * (i + 1)}]}
        for i in range(4)
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("ftdata") / "train.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def adapter(ckpt, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ftrun") / "adapter"
    cmd = [*QWENKIT, "finetune", "-m", str(ckpt), "--data", str(data_file), "--out", str(out), *FAST]
    run = subprocess.run([*cmd, "--epochs", "1"], capture_output=True, text=True, timeout=300, env=ENV)
    assert run.returncode == 0, run.stderr
    assert "step 2/2" in run.stderr and f"--lora {out}" in run.stdout
    return out


def _ids() -> torch.Tensor:
    return torch.randint(0, 5000, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model_dir: Path, **kw) -> torch.Tensor:
    with torch.no_grad():
        return load(model_dir, **kw)[0](_ids())


def test_finetune_writes_a_peft_adapter_that_changes_the_model(ckpt, adapter):
    spec, tensors = read_adapter(adapter)
    assert spec.r == 4 and spec.target_modules == ("c_attn", "c_proj", "w1", "w2")
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(ckpt)
    assert not torch.allclose(_logits(ckpt, lora=adapter), _logits(ckpt))


def test_merge_lora_gives_the_adapted_logits_and_generate_agrees(ckpt, adapter, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert main(["merge-lora", "-m", str(ckpt), "--lora", str(adapter), "--out", str(merged)]) == 0
    assert {"config.json", "generation_config.json", "qwen.tiktoken", "model.safetensors"} <= {
        p.name for p in merged.iterdir()
    }
    assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "float32"
    torch.testing.assert_close(_logits(merged), _logits(ckpt, lora=adapter), atol=1e-5, rtol=1e-5)

    def generate(*flags: str) -> str:
        cmd = [*QWENKIT, "generate", *flags, "Hello", "--greedy", "--max-new-tokens", "6"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
        assert run.returncode == 0, run.stderr
        return run.stdout

    assert generate("-m", str(ckpt), "--lora", str(adapter)) == generate("-m", str(merged))


def test_chat_with_lora(ckpt, adapter):
    cmd = [*QWENKIT, "chat", "-m", str(ckpt), "--lora", str(adapter), "--greedy", "--max-new-tokens", "6"]
    run = subprocess.run(cmd, input="hi\n", capture_output=True, text=True, timeout=120, env=ENV)
    assert run.returncode == 0, run.stderr
    # one answer (a random model's text may itself hold newlines); parity is checked through `generate` above
    assert run.stdout.strip() and "Traceback" not in run.stderr


def test_ctrl_c_saves_a_checkpoint_that_resume_continues(ckpt, data_file, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "-m", str(ckpt), "--data", str(data_file), "--out", str(out), *FAST, "--epochs", "100"]
    # SIGINT as a terminal delivers it, even when the test runner itself was started with SIGINT ignored
    # (a background job of a non-interactive shell): Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen([*QWENKIT, *args], stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("step 2/") or not line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, "".join(lines) + rest
    assert "continue with --resume" in rest and "Traceback" not in rest
    (checkpoint,) = out.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert step >= 2 and (checkpoint / STATE_FILE).is_file() and (checkpoint / "adapter_config.json").is_file()
    assert main([*args, "--resume", "--max-steps", str(step + 1)]) == 0
    assert read_adapter(out)[0].r == 4


def test_torchrun_two_processes_save_one_adapter(ckpt, data_file, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "qwenkit",
           "finetune", "-m", str(ckpt), "--data", str(data_file), "--out", str(out), *FAST, "--max-steps", "2",
           "--batch-size", "1"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr.count("step 2/2") == 1  # rank 0 reports
    assert [p.parent for p in out.rglob("adapter_config.json")] == [out]
    assert not torch.allclose(_logits(ckpt, lora=out), _logits(ckpt))


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_frozen_lm_head_gradient_equals_autograd(ckpt, quantize):
    """The routed frozen layers (lm_head here) pass the input gradient plain autograd would, names unchanged."""
    model = load(ckpt, quantize=quantize)[0]
    add_lora(model, LoraSpec(r=4, lora_dropout=0.0, target_modules=("c_attn",)))
    names = set(model.state_dict())
    x = torch.randn(3, 5, model.config.hidden_size, requires_grad=True)
    plain = model.lm_head(x)
    upstream = torch.randn(plain.shape)  # a loss linear in the output: the gradient does not depend on it
    (expected,) = torch.autograd.grad((plain * upstream).sum(), x)
    assert route_frozen_linears(model) == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.w1",
        "transformer.h.0.mlp.w2", "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_proj",
        "transformer.h.1.mlp.w1", "transformer.h.1.mlp.w2", "transformer.h.1.mlp.c_proj", "lm_head"]  # fmt: skip
    routed = model.lm_head(x)
    (got,) = torch.autograd.grad((routed * upstream).sum(), x)
    # int4: without autograd the forward takes the fast int4 kernel, with it the dequantize reference.
    torch.testing.assert_close(routed, plain, atol=1e-5 if quantize is None else 1e-3, rtol=1e-5)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert set(model.state_dict()) == names


def _error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"qwenkit {argv[0]}: error: "), err
    return err


def test_bad_input_is_one_line_and_status_2(ckpt, data_file, adapter, tmp_path, capsys):
    common = ["-m", str(ckpt), "--out", str(tmp_path / "o")]
    assert "no data file" in _error(capsys, "finetune", *common, "--data", str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"conversations": [{"from": "user", "value": "hi"}]}, {"conversations": [{"from": "bot"}]}]')
    assert "record 1, turn 0" in _error(capsys, "finetune", *common, "--data", str(bad))
    bad.write_text("{not json")
    assert "not valid JSON" in _error(capsys, "finetune", *common, "--data", str(bad))
    assert "not empty" in _error(capsys, "finetune", "-m", str(ckpt), "--data", str(data_file), "--out", str(adapter))
    assert "no checkpoint-N" in _error(capsys, "finetune", *common, "--data", str(data_file), "--resume")
    assert "lr" in _error(capsys, "finetune", *common, "--data", str(data_file), "--lr", "-1")
    assert "not a LoRA adapter" in _error(capsys, "merge-lora", *common[:2], "--lora", str(tmp_path), "--out", "x")
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", *common, "--data", str(data_file), "--method", "dora"])
    assert exit_.value.code == 2 and "invalid choice: 'dora'" in capsys.readouterr().err
    run = subprocess.run([*QWENKIT, "chat", "-m", str(ckpt), "--lora", str(tmp_path)], input="hi\n",
                         capture_output=True, text=True, timeout=120, env=ENV)  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr and "not a LoRA adapter" in run.stderr
