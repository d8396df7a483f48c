"""QWenTokenizer: golden ids from the official implementation, properties, huge inputs, streaming."""

from __future__ import annotations

import pickle
import random
import time
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenkit import QWenTokenizer, StreamDecoder
from qwenkit.tokenizer.tokenization import PAT_STR, SPECIAL_TOKENS
from qwenkit.tokenizer.vocab import OFFICIAL_VOCAB_SIZE_BYTES, official_vocab_file


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer(official_vocab_file())


def test_vocab_file_is_the_official_one():
    assert official_vocab_file().stat().st_size == OFFICIAL_VOCAB_SIZE_BYTES


def test_sizes_and_special_ids(tok):
    assert len(tok) == 151851
    assert len(tok.mergeable_ranks) == 151643
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert tok.special_tokens["<|extra_0|>"] == 151646
    assert tok.special_tokens["<|extra_204|>"] == 151850
    assert list(tok.special_tokens) == list(SPECIAL_TOKENS)


def test_golden_vectors(tok):
    assert tok.encode("12345") == [16, 17, 18, 19, 20]
    assert tok.encode('print("<|endoftext|>")') == [1350, 445, 151643, 899]
    # fmt: off
    assert tok.encode('print("<|endoftext|>")', allowed_special=set()) == [
        1350, 9639, 91, 8691, 723, 427, 91, 82598,
    ]
    # fmt: on
    assert tok.encode("Observation:") == [37763, 367, 25]
    assert tok.decode([51461]) == " \ufffd"
    assert tok.decode([51461, 117]) == " 根"
    assert tok.encode("你好") == [108386]


def test_nfc_normalisation(tok):
    decomposed = "e\u0301"  # e + combining acute -> é after NFC
    assert tok.encode(decomposed) == tok.encode("\u00e9")


def test_decode_options(tok):
    ids = tok.encode("hi<|im_end|>there<|extra_3|>")
    assert tok.decode(ids) == "hi<|im_end|>there<|extra_3|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hithere"
    assert tok.decode([51461], errors="ignore") == " "
    assert QWenTokenizer(official_vocab_file(), errors="strict").decode([16, 17]) == "12"
    with pytest.raises(UnicodeDecodeError):
        QWenTokenizer(official_vocab_file(), errors="strict").decode([51461])


def test_ids_that_name_no_token_decode_to_empty(tok):
    assert tok.decode([151851, 151935, 100000]) == tok.decode([100000])
    assert tok.decode(151900) == ""


def test_allowed_and_disallowed_special(tok):
    text = "a<|im_start|>b"
    assert tok.im_start_id in tok.encode(text)
    assert tok.im_start_id not in tok.encode(text, allowed_special=set())
    assert tok.im_start_id in tok.encode(text, allowed_special={"<|im_start|>"})
    assert tok.im_start_id not in tok.encode(text, allowed_special={"<|im_end|>"})
    with pytest.raises(ValueError, match="disallowed special token"):
        tok.encode(text, allowed_special=set(), disallowed_special="all")


def test_pickle_round_trip(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("pickled 你好 <|im_end|>") == tok.encode("pickled 你好 <|im_end|>")
    assert len(clone) == len(tok)


def test_from_pretrained_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="qwen.tiktoken"):
        QWenTokenizer.from_pretrained(tmp_path)


def test_encode_rejects_non_text(tok):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_decode_encode_round_trip(tok, text):
    assert tok.decode(tok.encode(text, allowed_special=set())) == unicodedata.normalize("NFC", text)


# Text rich in the characters the pre-tokenizer treats specially (whitespace kinds, newlines, punctuation).
_tricky = st.text(alphabet=st.sampled_from(list(" \t\n\r\x0b\x0c\u3000\xa0\x85ab1!'.你é")), max_size=80)


@settings(max_examples=600, deadline=None)
@given(_tricky)
def test_long_whitespace_splitting_matches_tiktoken(tok, text):
    # Force the splitting path on short runs and compare with tiktoken running the official regex itself.
    for max_run in (2, 3, 5):
        assert tok._encode_ordinary(text, max_run=max_run) == tok._enc.encode_ordinary(text)


@pytest.mark.parametrize(
    "text", [" " * 300_000, "x" + " " * 300_000 + "y", "!\n\n" + "\t " * 150_000 + "\n.a"]
)
def test_long_runs_equal_tiktoken_where_it_finishes(tok, text):
    assert tok.encode(text) == tok._enc.encode(text, allowed_special="all")


@pytest.mark.parametrize("kind", ["space", "letter", "newline", "cjk", "ideographic_space", "random"])
def test_one_megabyte_inputs_are_fast(tok, kind):
    rng = random.Random(0)
    text = {
        "space": " " * 1_000_000,  # crashes tiktoken's regex engine when passed as one run
        "letter": "a" * 1_000_000,
        "newline": "\n" * 1_000_000,
        "cjk": "你" * 350_000,
        "ideographic_space": "\u3000" * 350_000,
        "random": "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(1_000_000)),
    }[kind]
    start = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - start < 10
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_regex_is_the_official_one():
    assert PAT_STR == (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    )


def _stream(tok: QWenTokenizer, ids: list[int], **kwargs) -> list[str]:
    decoder = StreamDecoder(tok, **kwargs)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=151935), max_size=40))
def test_stream_decoder_concatenates_to_decode(tok, ids):
    assert "".join(_stream(tok, ids)) == tok.decode(ids)
    assert "".join(_stream(tok, ids, skip_special_tokens=True)) == tok.decode(ids, skip_special_tokens=True)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=30))
def test_stream_deltas_never_hold_broken_characters(tok, text):
    # Byte-level ids split multi-byte characters; no delta may carry a replacement character the text lacks.
    ids = [tok.mergeable_ranks[bytes([b])] for b in text.encode("utf-8")]
    deltas = _stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text
    assert "".join(deltas) == text


def test_stream_decoder_example(tok):
    assert _stream(tok, [51461, 117]) == [" ", "根", ""]
    assert _stream(tok, [51461]) == [" ", "\ufffd"]
