"""Generation layer: sampling, stop strings, the batched token generator, streams and the model card's chat API.

Owns `SamplingParams` and the logits processors (`sampling`), stop strings across deltas (`stopping`),
`TokenGenerator`/`stream`/`generate`/`generate_batch` (`generate`) and `chat`/`chat_stream`/`generate_ids` plus
the `ChatMixin` the model class inherits (`chat`). It drives any model with the `CausalLM` shape (`protocol`)
and imports no model code: the transformer, caches and weights belong to the layers above.
"""

from .protocol import CausalLM
from .sampling import SamplingParams

__all__ = ["CausalLM", "SamplingParams"]
