"""Finetuning: preprocess against a restatement of the official algorithm, LoRA identities, merging, peft parity,
loss going down and exact resume, on the tiny random checkpoint."""

from __future__ import annotations

import random

import pytest
import torch

from qwenkit.checkpoints.adapter_files import apply_adapter, read_adapter, save_adapter
from qwenkit.checkpoints.loading import load
from qwenkit.checkpoints.lora import LoraSpec, add_lora, lora_modules, merge_lora
from qwenkit.checkpoints.quantize import save_model
from qwenkit.checkpoints.synthetic import make_checkpoint
from qwenkit.train.data import IGNORE_TOKEN_ID, load_conversations, preprocess
from qwenkit.train.loop import train
from qwenkit.train.setup import TrainConfig

WORDS = ["hello", "世界", "<|im_end|>", "a b", "\n", "123", "Qwen", " ", "ok!"]


def official_preprocess(sources, tok, max_len, system_message="You are a helpful assistant."):
    """The official finetune.py preprocess, restated (special-token text in values encoded as plain text)."""
    def enc(text):
        return tok.encode(text, allowed_special=set(), disallowed_special=())

    im_start, im_end, nl = tok.im_start_id, tok.im_end_id, enc("\n")
    roles = {"user": [im_start] + enc("user"), "assistant": [im_start] + enc("assistant")}
    ids_out, tgt_out = [], []
    for source in sources:
        if source[0]["from"] != "user":
            source = source[1:]
        system = [im_start] + enc("system") + nl + enc(system_message) + [im_end] + nl
        ids, tgt = list(system), [im_start] + [IGNORE_TOKEN_ID] * (len(system) - 3) + [im_end] + nl
        for s in source:
            role = roles[s["from"]]
            turn = role + nl + enc(s["value"]) + [im_end] + nl
            ids += turn
            if s["from"] == "user":
                tgt += [im_start] + [IGNORE_TOKEN_ID] * (len(turn) - 3) + [im_end] + nl
            else:
                tgt += [im_start] + [IGNORE_TOKEN_ID] * len(role) + turn[len(role) + 1 : -2] + [im_end] + nl
        ids_out.append((ids + [tok.eod_id] * (max_len - len(ids)))[:max_len])
        tgt_out.append((tgt + [IGNORE_TOKEN_ID] * (max_len - len(tgt)))[:max_len])
    return ids_out, tgt_out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ft") / "tiny", preset="tiny", dtype="float32")


def _random_conversations(rng: random.Random, n: int):
    convs = []
    for _ in range(n):
        turns = rng.randint(1, 6)
        first = rng.choice(["user", "user", "assistant"])
        roles = ["user", "assistant"] if first == "user" else ["assistant", "user"]
        convs.append([
            {"from": roles[i % 2], "value": "".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))}
            for i in range(turns)
        ])  # fmt: skip
    return convs


def test_preprocess_equals_official(ckpt):
    tok = load(ckpt)[1]
    rng = random.Random(0)
    convs = _random_conversations(rng, 60)
    lengths = [len(official_preprocess([c], tok, 10_000)[0][0]) for c in convs]
    for max_len in (min(lengths), sorted(lengths)[30], max(lengths), max(lengths) + 3):
        with pytest.warns(UserWarning) if max_len < max(lengths) else _nowarn():
            got = preprocess(convs, tok, max_len)
        ids, tgt = official_preprocess(convs, tok, max_len)
        assert got["input_ids"].tolist() == ids
        assert got["labels"].tolist() == tgt
        assert got["attention_mask"].tolist() == (torch.tensor(ids) != tok.eod_id).tolist()


class _nowarn:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def test_malformed_records_name_the_index(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"conversations": [{"from": "user", "value": "hi"}]}, {"conversations": [{"from": "bot", "value": "x"}]}]')
    with pytest.raises(ValueError, match="record 1, turn 0: 'from'"):
        load_conversations(bad)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    assert load_conversations(jsonl) == [[{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]]


def _ids(n=2, t=12):
    return torch.randint(0, 5000, (n, t), generator=torch.Generator().manual_seed(1))


def _randomize_b(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=gen))


def test_fresh_lora_is_exactly_the_base_and_merge_matches(ckpt, tmp_path):
    model = load(ckpt)[0]
    ids = _ids()
    # Inference regime both times: with autograd recording, lm_head (not adapted) would take F.linear instead
    # of the CPU GEMV kernel, a different summation order.
    with torch.no_grad():
        base = model(ids)
    add_lora(model, LoraSpec(r=4, lora_dropout=0.0))
    with torch.no_grad():
        assert torch.equal(model(ids), base)
    _randomize_b(model)
    adapted = model(ids)
    assert not torch.allclose(adapted, base)
    save_adapter(model, tmp_path / "adapter", LoraSpec(r=4, lora_dropout=0.0), str(ckpt))
    merge_lora(model)
    torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=1e-5)
    save_model(model, tmp_path / "merged", source_dir=ckpt)
    torch.testing.assert_close(load(tmp_path / "merged")[0](ids), adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(load(ckpt, lora=tmp_path / "adapter")[0](ids), adapted, atol=1e-5, rtol=1e-5)


def test_peft_applies_the_saved_adapter_identically(ckpt, tmp_path):
    peft = pytest.importorskip("peft")
    from qwenkit.model.transformer import QWenLMHeadModel

    spec = LoraSpec(r=4, lora_alpha=8, lora_dropout=0.0)
    ours = load(ckpt)[0]
    add_lora(ours, spec)
    _randomize_b(ours)
    save_adapter(ours, tmp_path / "a", spec, str(ckpt))
    # A plain model with the official module names, nn.Linear layers, the base weights.
    plain = QWenLMHeadModel(ours.config, dtype=torch.float32)
    plain.load_state_dict(load(ckpt)[0].state_dict())
    config = peft.LoraConfig(**{k: v for k, v in __import__("json").loads(
        (tmp_path / "a" / "adapter_config.json").read_text()).items() if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias")})  # fmt: skip
    plain = peft.inject_adapter_in_model(config, plain)
    _, tensors = read_adapter(tmp_path / "a")
    from safetensors.torch import load_file

    result = peft.set_peft_model_state_dict(plain, load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert not [k for k in result.unexpected_keys if "lora" in k]
    ids = _ids()
    torch.testing.assert_close(plain.eval()(ids), ours(ids), atol=1e-5, rtol=1e-5)
    assert len(tensors) == 2 * len(lora_modules(ours))


def _data(tok, n=6):
    convs = [[{"from": "user", "value": f"q{i}"}, {"from": "assistant", "value": "yes " * (i + 1)}] for i in range(n)]
    return preprocess(convs, tok, 32)


def _cfg(method="lora", **kw):
    return TrainConfig(method=method, lora=LoraSpec(r=4, lora_dropout=0.1), epochs=2, batch_size=2, grad_accum=1,
                       lr=2e-2, save_steps=2, **kw)  # fmt: skip


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_training_lowers_the_loss_and_saves_an_adapter(ckpt, tmp_path, method):
    model, tok = load(ckpt, quantize="int4" if method == "qlora" else None)
    data = _data(tok)
    result = train(model, data, _cfg(method), tmp_path / "out", base_model=str(ckpt), stream=None)
    assert result.steps == 6 and result.losses[-1] < result.losses[0]
    spec, tensors = read_adapter(tmp_path / "out")
    assert spec.r == 4 and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in tensors)
    if method == "qlora":  # the frozen int4 base got no gradient and stayed int4
        assert all(not b.requires_grad for b in model.buffers())


def test_resume_equals_an_uninterrupted_run(ckpt, tmp_path):
    model, tok = load(ckpt)
    data = _data(tok)
    full = train(model, data, _cfg(), tmp_path / "a", stream=None)
    model, _ = load(ckpt)
    part = train(model, data, _cfg(max_steps=4), tmp_path / "b", stream=None)
    assert part.steps == 4
    model, _ = load(ckpt)
    rest = train(model, data, _cfg(), tmp_path / "b", resume=True, stream=None)
    assert rest.losses == full.losses
    a, b = read_adapter(tmp_path / "a")[1], read_adapter(tmp_path / "b")[1]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_apply_adapter_rejects_a_mismatched_model(ckpt, tmp_path):
    model = load(ckpt)[0]
    add_lora(model, LoraSpec(r=4, target_modules=("c_attn",)))
    save_adapter(model, tmp_path / "a", LoraSpec(r=4, target_modules=("c_attn",)), "x")
    (tmp_path / "a" / "adapter_config.json").write_text(
        (tmp_path / "a" / "adapter_config.json").read_text().replace('"r": 4', '"r": 8'))
    with pytest.raises(ValueError, match="another model size"):
        apply_adapter(load(ckpt)[0], tmp_path / "a")
