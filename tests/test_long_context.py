"""Dynamic NTK and logn attention beyond seq_length, against a naive fp64 reference written here from the formulas
(docs/architecture.md), independent of qwenkit.model: explicit per-channel-pair rotation, explicit score matrices."""

from __future__ import annotations

import math

import pytest
import torch

from qwenkit.model.transformer import QWenLMHeadModel

SEQ = 32  # seq_length of the tiny model, so long context starts early


def _ref_alpha(prompt_len: int) -> float:
    return float(max(2 ** math.ceil(math.log2(prompt_len / SEQ) + 1) - 1, 1))


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rotate(x: torch.Tensor, pos: int, rot: int, base: float) -> torch.Tensor:
    """Rotate channel pairs (i, i + rot/2) of one head vector `[D]` by angle pos * base**(-2i/rot)."""
    out = x.clone()
    half = rot // 2
    for i in range(half):
        angle = pos * base ** (-2 * i / rot)
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


@torch.no_grad()
def reference_logits(
    model: QWenLMHeadModel, ids: list[int], positions: list[int], alpha: float, ntk: bool, logn: bool
) -> torch.Tensor:
    """Logits [T, V] in fp64 for one sequence whose tokens sit at `positions`, attending causally in order."""
    c = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    heads, dim, rot, eps = c.num_attention_heads, c.head_dim, c.rotary_dim, c.layer_norm_epsilon
    base = c.rotary_emb_base * (alpha ** (rot / (rot - 2)) if ntk else 1.0)
    x = w["transformer.wte.weight"][ids]  # [T, C]
    steps = len(ids)
    for layer in range(c.num_hidden_layers):
        p = f"transformer.h.{layer}."
        y = _rms(x, w[p + "ln_1.weight"], eps)
        qkv = y @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = qkv.split(c.hidden_size, dim=-1)
        attn_out = torch.zeros_like(x)
        for h in range(heads):
            cols = slice(h * dim, (h + 1) * dim)
            qh = torch.stack([_rotate(q[t, cols], positions[t], rot, base) for t in range(steps)])
            kh = torch.stack([_rotate(k[t, cols], positions[t], rot, base) for t in range(steps)])
            if logn:
                for t in range(steps):
                    if positions[t] + 1 > c.seq_length:
                        qh[t] = qh[t] * math.log(positions[t] + 1) / math.log(c.seq_length)
            scores = qh @ kh.T / math.sqrt(dim)  # [T, T]
            for t in range(steps):
                scores[t, t + 1 :] = -math.inf
            attn_out[:, cols] = torch.softmax(scores, dim=-1) @ v[:, cols]
        x = x + attn_out @ w[p + "attn.c_proj.weight"].T
        y = _rms(x, w[p + "ln_2.weight"], eps)
        a, g = y @ w[p + "mlp.w1.weight"].T, y @ w[p + "mlp.w2.weight"].T
        x = x + (a * g / (1 + torch.exp(-g))) @ w[p + "mlp.c_proj.weight"].T
    return _rms(x, w["transformer.ln_f.weight"], eps) @ w["lm_head.weight"].T


def _close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 2e-4) -> None:
    diff = (ours.double() - ref).abs().max().item()
    assert diff <= tol, f"max |diff| {diff} > {tol}"


@pytest.fixture
def model(make_tiny_model):
    return make_tiny_model(seq_length=SEQ, max_position_embeddings=SEQ)


def _seq(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("length, alpha", [(20, 1.0), (40, 3.0), (70, 7.0), (130, 15.0)])
@torch.no_grad()
def test_prefill_beyond_seq_length(model, length, alpha):
    assert _ref_alpha(length) == alpha == model.ntk_alpha(length)
    ids = _seq(length)
    ref = reference_logits(model, ids[0].tolist(), list(range(length)), alpha, ntk=True, logn=True)
    _close(model(ids)[0], ref)  # alpha derived from the last position + 1
    _close(model(ids, ntk_alpha=alpha)[0], ref)


@pytest.mark.parametrize("prompt, total", [(20, 70), (40, 70)])
@torch.no_grad()
def test_decode_across_seq_length_keeps_prefill_alpha(model, prompt, total):
    # Decode crosses seq_length (32) and 2 * seq_length (64) with the alpha fixed at prefill.
    ids = _seq(total, seed=1)
    alpha = model.ntk_alpha(prompt)
    ref = reference_logits(model, ids[0].tolist(), list(range(total)), alpha, ntk=True, logn=True)
    cache = model.new_cache(1, total)
    _close(model(ids[:, :prompt], cache=cache, ntk_alpha=alpha)[0], ref[:prompt])
    for t in range(prompt, total):
        step = model(ids[:, t : t + 1], positions=torch.tensor([[t]]), cache=cache, ntk_alpha=alpha)
        _close(step[0, 0], ref[t])


@torch.no_grad()
def test_per_row_alpha_in_a_padded_batch(model):
    lengths, alphas = [20, 70], torch.tensor([1.0, 7.0])
    ids = torch.cat([_seq(70, seed=2), _seq(70, seed=3)])
    out = model(ids, ntk_alpha=alphas)
    for row, n in enumerate(lengths):
        ref = reference_logits(model, ids[row, :n].tolist(), list(range(n)), float(alphas[row]), True, True)
        _close(out[row, :n], ref)


@torch.no_grad()
def test_positions_past_32k_are_not_capped(model):
    # Eight tokens at positions 40000.. (no cache: causal over the input), alpha 15: rotary and logn uncapped.
    ids = _seq(8, seed=4)
    pos = list(range(40000, 40008))
    ref = reference_logits(model, ids[0].tolist(), pos, 15.0, ntk=True, logn=True)
    # fp32 angles of ~4e4 rad carry ~1e-3 rad of rounding error, hence the looser tolerance.
    _close(model(ids, positions=torch.tensor([pos]), ntk_alpha=15.0)[0], ref, tol=5e-3)


@torch.no_grad()
def test_flags_off_means_plain_rotary_and_no_logn(make_tiny_model):
    model = make_tiny_model(seq_length=SEQ, use_dynamic_ntk=False, use_logn_attn=False)
    assert model.ntk_alpha(130) == 1.0
    ids = _seq(70, seed=5)
    ref = reference_logits(model, ids[0].tolist(), list(range(70)), 1.0, ntk=False, logn=False)
    _close(model(ids)[0], ref)
    _close(model(ids, ntk_alpha=7.0)[0], ref)  # an explicit alpha is ignored when use_dynamic_ntk is false
    with_flags = reference_logits(model, ids[0].tolist(), list(range(70)), 7.0, ntk=True, logn=True)
    assert (with_flags - ref).abs().max() > 1e-2  # the reference itself tells the two apart
