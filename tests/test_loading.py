"""load(): round trips against a normally built model, every file layout, and a clear error for each bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenkit.checkpoints import weight_files
from qwenkit.checkpoints.loading import load
from qwenkit.checkpoints.synthetic import make_checkpoint
from qwenkit.generation.sampling import OFFICIAL_GENERATION_CONFIG
from qwenkit.model.config import QwenConfig, preset
from qwenkit.model.transformer import QWenLMHeadModel
from qwenkit.tokenizer.tokenization import QWenTokenizer

IDS = torch.tensor([[9707, 11, 1879, 374, 264, 1273, 13], [40, 1075, 279, 5284, 382, 151643, 0]])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """Tiny fp32 checkpoint in one file."""
    return make_checkpoint(tmp_path_factory.mktemp("load") / "tiny", dtype="float32", seed=3)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The same weights as `ckpt` in three shards."""
    return make_checkpoint(tmp_path_factory.mktemp("load") / "tiny3", dtype="float32", seed=3, shards=3)


@pytest.fixture(scope="module")
def weights(ckpt) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def _reference(ckpt: Path, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> QWenLMHeadModel:
    """The model built the ordinary way (real tensors, then load_state_dict)."""
    net = QWenLMHeadModel(QwenConfig.from_file(ckpt), dtype=dtype)
    net.load_state_dict({k: v.to(dtype) for k, v in weights.items()})
    return net.eval()


def _clone(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint dir whose files are symlinks, so a test can replace just the file it breaks."""
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).symlink_to(path)
    return dst


def _replace(path: Path, data: bytes | str) -> None:
    path.unlink()
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


def _assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        assert torch.equal(a(IDS), b(IDS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_equals_a_normally_built_model(ckpt, weights, dtype):
    net, tok = load(ckpt, dtype=dtype, device="cpu")
    _assert_same_model(net, _reference(ckpt, weights, dtype))
    assert isinstance(tok, QWenTokenizer) and tok.encode("Hello") == [9707]
    assert net.config == QwenConfig.from_file(ckpt)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert all(p.device.type == "cpu" for p in net.parameters())


def test_defaults_on_cpu_are_fp32(ckpt):
    net, _ = load(ckpt)
    assert net.transformer.wte.weight.dtype == torch.float32


def test_bf16_checkpoint_loaded_as_fp32(tmp_path, weights):
    bf16 = make_checkpoint(tmp_path / "bf16", dtype="bf16", seed=3)
    net, _ = load(bf16, dtype="fp32")
    for key, value in net.state_dict().items():
        assert torch.equal(value, weights[key].to(torch.bfloat16).float()), key


def test_chunked_copy_with_conversion(ckpt, weights, monkeypatch):
    # Tiny tensors fit one chunk; force many chunks (and a ragged last one) to cover the row-range reads.
    monkeypatch.setattr(weight_files, "_CHUNK_BYTES", 3000)
    for dtype in (torch.float32, torch.bfloat16):
        net, _ = load(ckpt, dtype=dtype)
        _assert_same_model(net, _reference(ckpt, weights, dtype))


def test_sharded_equals_single_file(ckpt, sharded):
    assert (sharded / "model.safetensors.index.json").is_file()
    _assert_same_model(load(sharded)[0], load(ckpt)[0])


def test_pytorch_model_bin_single_and_sharded(tmp_path, ckpt, weights):
    single = tmp_path / "bin"
    single.mkdir()
    for name in ("config.json", "qwen.tiktoken"):
        (single / name).symlink_to(ckpt / name)
    torch.save(weights, single / "pytorch_model.bin")
    reference = load(ckpt)[0]
    _assert_same_model(load(single)[0], reference)

    shards = tmp_path / "bin-sharded"
    shards.mkdir()
    for name in ("config.json", "qwen.tiktoken"):
        (shards / name).symlink_to(ckpt / name)
    keys = list(weights)
    weight_map = {}
    for i, part in enumerate((keys[:5], keys[5:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: weights[k] for k in part}, shards / name)
        weight_map.update(dict.fromkeys(part, name))
    (shards / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    _assert_same_model(load(shards)[0], reference)


def test_tied_embeddings_stay_tied(tmp_path):
    ckpt = make_checkpoint(tmp_path / "tied", dtype="float32", overrides={"tie_word_embeddings": True})
    assert "lm_head.weight" not in load_file(ckpt / "model.safetensors")  # saved once, as Hugging Face does
    net, _ = load(ckpt)
    assert net.lm_head.weight is net.transformer.wte.weight
    with torch.no_grad():
        assert torch.isfinite(net(IDS)).all()


def test_generation_config_read_or_defaulted(tmp_path, ckpt):
    net, _ = load(ckpt)
    assert net.generation_config == {**OFFICIAL_GENERATION_CONFIG, "transformers_version": "4.37.2"}
    changed = _clone(ckpt, tmp_path / "g")
    _replace(changed / "generation_config.json", json.dumps({"top_p": 0.5, "chat_format": "chatml"}))
    assert load(changed)[0].generation_config == {"top_p": 0.5, "chat_format": "chatml"}
    (changed / "generation_config.json").unlink()
    assert load(changed)[0].generation_config == OFFICIAL_GENERATION_CONFIG


def test_auto_map_code_is_never_run(tmp_path, ckpt):
    d = _clone(ckpt, tmp_path / "code")
    (d / "modeling_qwen.py").write_text("raise SystemExit('remote code was executed')\n")
    (d / "tokenization_qwen.py").write_text("raise SystemExit('remote code was executed')\n")
    load(d)


def test_progress_bar_forced(ckpt, capsys):
    load(ckpt, progress=True)
    assert "Loading weights" in capsys.readouterr().err
    load(ckpt, progress=False)
    assert capsys.readouterr().err == ""


# ---- errors ----------------------------------------------------------------------------------------------------


def test_missing_shard(tmp_path, sharded):
    d = _clone(sharded, tmp_path / "m")
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        load(d)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0001])
def test_truncated_safetensors(tmp_path, ckpt, keep):
    d = _clone(ckpt, tmp_path / "t")
    data = (ckpt / "model.safetensors").read_bytes()
    _replace(d / "model.safetensors", data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load(d)


def test_corrupt_bin(tmp_path, ckpt):
    d = tmp_path / "badbin"
    d.mkdir()
    for name in ("config.json", "qwen.tiktoken"):
        (d / name).symlink_to(ckpt / name)
    (d / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load(d)


def _rewrite_weights(tmp_path: Path, ckpt: Path, weights: dict[str, torch.Tensor]) -> Path:
    d = _clone(ckpt, tmp_path / "w")
    (d / "model.safetensors").unlink()
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_wrong_shape(tmp_path, ckpt, weights):
    bad = dict(weights)
    bad["transformer.h.1.mlp.w1.weight"] = torch.zeros(100, 64)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.w1\.weight.*\[100, 64\]"):
        load(_rewrite_weights(tmp_path, ckpt, bad))


def test_missing_key(tmp_path, ckpt, weights):
    bad = {k: v for k, v in weights.items() if k != "transformer.h.0.ln_2.weight"}
    with pytest.raises(ValueError, match=r"lacks.*transformer\.h\.0\.ln_2\.weight"):
        load(_rewrite_weights(tmp_path, ckpt, bad))


def test_unexpected_key(tmp_path, ckpt, weights):
    bad = {**weights, "transformer.rotary_emb.inv_freq": torch.ones(8)}
    with pytest.raises(ValueError, match=r"does not have.*rotary_emb\.inv_freq"):
        load(_rewrite_weights(tmp_path, ckpt, bad))


def test_non_float_tensor(tmp_path, ckpt, weights):
    bad = {**weights, "transformer.ln_f.weight": torch.ones(64, dtype=torch.int32)}
    with pytest.raises(ValueError, match=r"ln_f\.weight.*not a float"):
        load(_rewrite_weights(tmp_path, ckpt, bad))


def test_index_disagrees_with_shards(tmp_path, sharded):
    d = _clone(sharded, tmp_path / "i")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    key = next(k for k, v in index["weight_map"].items() if v == "model-00002-of-00003.safetensors")
    moved = {**index, "weight_map": {**index["weight_map"], key: "model-00003-of-00003.safetensors"}}
    _replace(d / "model.safetensors.index.json", json.dumps(moved))
    with pytest.raises(ValueError, match=rf"disagrees with shard model-0000[23].*'{key}'"):
        load(d)
    dropped = {**index, "weight_map": {k: v for k, v in index["weight_map"].items() if k != key}}
    _replace(d / "model.safetensors.index.json", json.dumps(dropped))
    with pytest.raises(ValueError, match="disagrees with shard model-00002-of-00003"):
        load(d)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden_size": 128, "kv_channels": 32}, r"shape .* config.json implies"),
        ({"num_hidden_layers": 3}, r"lacks.*transformer\.h\.2\..*num_hidden_layers=3"),
        ({"num_hidden_layers": 1}, r"does not have.*transformer\.h\.1\..*num_hidden_layers=1"),
        ({"vocab_size": 1000}, r"(lm_head|transformer\.wte)\.weight.*\[151936, 64\].*\[1000, 64\]"),
    ],
)
def test_config_does_not_match_weights(tmp_path, ckpt, change, match):
    d = _clone(ckpt, tmp_path / "c")
    config = json.loads((ckpt / "config.json").read_text())
    _replace(d / "config.json", json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=match):
        load(d)


def test_missing_config_weights_or_vocab(tmp_path, ckpt):
    d = _clone(ckpt, tmp_path / "nc")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config"):
        load(d)
    d = _clone(ckpt, tmp_path / "nw")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load(d)
    d = _clone(ckpt, tmp_path / "nv")
    (d / "qwen.tiktoken").unlink()
    with pytest.raises(FileNotFoundError, match="qwen.tiktoken"):
        load(d)


@pytest.mark.parametrize("dtype", ["int8", "float64", torch.int8, "half ", None])
def test_bad_dtype(ckpt, dtype):
    with pytest.raises(ValueError, match="valid: auto, float32, fp32, bfloat16"):
        load(ckpt, dtype=dtype)


@pytest.mark.parametrize("device", ["gpu", "meta", "cuda:0" if not torch.cuda.is_available() else "tpu"])
def test_bad_device(ckpt, device):
    with pytest.raises(ValueError, match="valid: auto, cpu, cuda|CUDA is not available"):
        load(ckpt, device=device)


def test_path_that_is_neither_dir_nor_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory and does not look like a hub id"):
        load(tmp_path / "nope" / "deeper" / "still")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load(tmp_path / "file")


def _offline(script: str, hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )


def test_unknown_hub_id_offline_says_how_to_download(tmp_path):
    script = "from qwenkit import load\nload('Qwen/Qwen-1_8B-Chat')"
    result = _offline(script, tmp_path / "hf")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("FileNotFoundError") and "Qwen/Qwen-1_8B-Chat" in last
    assert "download Qwen/Qwen-1_8B-Chat --local-dir DIR" in last


def test_hub_id_resolved_from_the_cache_offline(tmp_path, ckpt):
    # The Hugging Face cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}.
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-qwen"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    _clone(ckpt, repo / "snapshots" / commit)
    script = "from qwenkit import load\nnet, tok = load('someone/tiny-qwen')\nprint(net.config.hidden_size)"
    result = _offline(script, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "64"


def _file_backing(tensor: torch.Tensor) -> str | None:
    """The file mapped at the tensor's address in this process, if any."""
    ptr = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_embedding_is_mapped_from_the_file_when_dtypes_match(tmp_path, ckpt, weights):
    net, _ = load(ckpt, dtype="float32")
    assert _file_backing(net.transformer.wte.weight) == str(ckpt / "model.safetensors")
    assert _file_backing(net.lm_head.weight) != str(ckpt / "model.safetensors")  # everything else is copied
    _assert_same_model(net, _reference(ckpt, weights, torch.float32))
    converted, _ = load(ckpt, dtype="bfloat16")  # another dtype: a converted copy
    assert _file_backing(converted.transformer.wte.weight) != str(ckpt / "model.safetensors")
    tied = make_checkpoint(tmp_path / "tied", dtype="float32", overrides={"tie_word_embeddings": True})
    tied_net, _ = load(tied, dtype="float32")  # lm_head reads a tied embedding whole: copied
    assert _file_backing(tied_net.transformer.wte.weight) != str(tied / "model.safetensors")


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unavailable"
    return text.split("[", 1)[1].split("]", 1)[0]


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="transparent huge pages are off here")
def test_large_weights_get_huge_pages():
    tensor = torch.empty(256 << 20, dtype=torch.uint8)  # large enough to be a fresh mapping
    weight_files.advise_huge_pages(tensor)
    tensor.fill_(1)  # first touch after the advice
    # The advice splits the mapping at 2 MB boundaries: sum over every mapping the tensor overlaps.
    start, end, huge_kb, inside = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes, 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            lo, hi = (int(x, 16) for x in first.split("-"))
            inside = lo < end and start < hi
        elif inside and line.startswith("AnonHugePages:"):
            huge_kb += int(line.split()[1])
    assert huge_kb >= 2048


def test_loading_imports_no_compiler_stack(ckpt):
    """Building the meta model must not run nn.init on meta tensors: that imports torch._dynamo and sympy (1.7 s
    and ~60 MB of resident memory on the full-size model's memory profile) in a process that only reads weights."""
    script = (
        "import sys; from qwenkit.checkpoints.loading import load\n"
        f"model, _ = load({str(ckpt)!r}, progress=False)\n"
        "assert model.transformer.wte.weight.shape[0] == model.config.vocab_size\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_meta_model_embedding_is_uninitialized_but_real_models_are_random():
    config = preset("tiny")
    assert QWenLMHeadModel(config, device="meta").transformer.wte.weight.is_meta
    torch.manual_seed(0)
    weight = QWenLMHeadModel(config).transformer.wte.weight
    assert weight.requires_grad and 0.5 < weight.std().item() < 1.5  # nn.Embedding's N(0, 1) init
