"""Cut text at piece boundaries that Qwen's pre-tokenizer regex is certain to produce.

tiktoken runs the official regex with a backtracking engine that overflows its stack on very long runs of
whitespace (about a million spaces crash it). Long whitespace runs are split into pieces here, by the same rules
the regex applies, so the ids are identical to what tiktoken would give if it did not crash; every other span is
left to tiktoken. Special tokens are split off by the caller first (tiktoken also runs the regex between them).

The official regex, alternatives numbered:
    1 (?i:'s|'t|'re|'ve|'m|'ll|'d)  2 [^\\r\\n\\p{L}\\p{N}]?\\p{L}+  3 \\p{N}  4 ' ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*'
    5 \\s*[\\r\\n]+  6 \\s+(?!\\S)  7 \\s+
Matching at a position depends only on the text from that position on, so once a boundary is known the rest
can be encoded on its own.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

# Unicode White_Space, which is what `\s` means in the Rust regex engine (Python's str.isspace() differs).
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_NEWLINES = "\r\n"

# Runs shorter than this go to tiktoken as they are; it handles tens of thousands of spaces without trouble.
DEFAULT_MAX_RUN = 4096


def _is_punct(ch: str) -> bool:
    """True for `[^\\s\\p{L}\\p{N}]`: neither whitespace, nor letter, nor number."""
    return unicodedata.category(ch)[0] not in "LN" and not re.match(f"[{WHITESPACE}]", ch)


def split_long_whitespace(text: str, max_run: int = DEFAULT_MAX_RUN) -> Iterator[tuple[str, bool]]:
    """Yield `(span, is_piece)` covering `text` in order.

    `is_piece=True` spans are single regex pieces (whitespace) to be BPE-encoded as they are; the others are
    ordinary text for the regex, containing no whitespace run of `max_run` characters or more.
    """
    run_re = re.compile(f"[{WHITESPACE}]{{{max_run},}}")
    cur = 0
    for run in run_re.finditer(text):
        i, j = run.span()
        # A punctuation piece (alternative 4) right before the run swallows the run's leading newlines.
        h = 0
        if i > cur and _is_punct(text[i - 1]):
            while i + h < j and text[i + h] in _NEWLINES:
                h += 1
        if i + h > cur:
            yield text[cur : i + h], False
        s = i + h
        # Alternative 5 takes everything up to the last newline of the run.
        last_nl = max(text.rfind("\r", s, j), text.rfind("\n", s, j))
        if last_nl >= 0:
            yield text[s : last_nl + 1], True
            s = last_nl + 1
        if s < j:
            if j == len(text):  # alternative 6 at the end of the text takes the rest
                yield text[s:j], True
                s = j
            elif j - 1 > s:  # alternative 6 leaves the last whitespace character to what follows
                yield text[s : j - 1], True
                s = j - 1
        cur = s
    if cur < len(text):
        yield text[cur:], False
