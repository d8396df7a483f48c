"""What generation needs from a model: the `CausalLM` protocol (logits over a cache, a fresh cache, NTK alpha).

Generation drives any object with this shape, so it depends on no model code: `qwenkit.model.QWenLMHeadModel`
satisfies it, and tests or servers may pass a scripted stand-in. The cache is opaque here: generation only
hands back to the model what `new_cache()` returned.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class CausalLM(Protocol):
    config: Any  # has at least `vocab_size`: rows of the output layer (151,936 for Qwen v1)

    @property
    def device(self) -> torch.device: ...

    def __call__(
        self,
        input_ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor | None = None,  # [B, T]
        cache: Any = None,
        ntk_alpha: float | torch.Tensor | None = None,  # float or [B]
        output_index: torch.Tensor | None = None,  # [B]
        input_lengths: torch.Tensor | None = None,  # [B]: real tokens per row, right padding after them
    ) -> torch.Tensor:  # fp32 logits [B, T, V] (or [B, V] with output_index)
        ...

    def new_cache(self, max_batch_size: int, max_seq_len: int) -> Any: ...

    def ntk_alpha(self, prompt_len: int) -> float: ...
