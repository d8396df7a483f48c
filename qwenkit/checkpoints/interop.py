"""Map Qwen v1 weights to transformers' Qwen2 layout, which computes the same function within `seq_length`.

Used by the parity tests (an independent reference implementation) and the peer benchmarks. Qwen v1 keeps q|k|v in
one `c_attn` and gates the MLP with `w2`; Qwen2 splits q/k/v and calls the gate `gate_proj`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..model.config import QwenConfig


def qwen2_config_kwargs(config: QwenConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.Qwen2Config` describing the same network (no NTK / logn)."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.layer_norm_epsilon,
        "rope_theta": float(config.rotary_emb_base),
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_sliding_window": False,
    }


def to_qwen2_state_dict(ours: Mapping[str, torch.Tensor], config: QwenConfig) -> dict[str, torch.Tensor]:
    """Our (= the official) state dict under Qwen2ForCausalLM's names; tensors are views, not copies."""
    sd = {
        "model.embed_tokens.weight": ours["transformer.wte.weight"],
        "model.norm.weight": ours["transformer.ln_f.weight"],
        "lm_head.weight": ours["lm_head.weight"],
    }
    for i in range(config.num_hidden_layers):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            wq, wk, wv = ours[p + f"attn.c_attn.{kind}"].chunk(3, dim=0)
            sd[q + f"self_attn.q_proj.{kind}"] = wq
            sd[q + f"self_attn.k_proj.{kind}"] = wk
            sd[q + f"self_attn.v_proj.{kind}"] = wv
        sd[q + "self_attn.o_proj.weight"] = ours[p + "attn.c_proj.weight"]
        sd[q + "mlp.up_proj.weight"] = ours[p + "mlp.w1.weight"]
        sd[q + "mlp.gate_proj.weight"] = ours[p + "mlp.w2.weight"]
        sd[q + "mlp.down_proj.weight"] = ours[p + "mlp.c_proj.weight"]
        sd[q + "input_layernorm.weight"] = ours[p + "ln_1.weight"]
        sd[q + "post_attention_layernorm.weight"] = ours[p + "ln_2.weight"]
    return sd
