"""Stop strings for streamed text: release what is safe, hold back what may start a stop string, never leak one.

`StopStringMatcher` consumes text deltas (from tokenizer.StreamDecoder) and runs an Aho-Corasick automaton over
them, one character at a time, so each delta costs O(len(delta) + longest stop string) whatever the text length.
Stop token ids are not handled here; the generator checks those on ids.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feed text deltas with `push`; get back the text that can be shown now and whether a stop string completed.

    Generation stops as soon as any stop string completes; if several complete at the same character, the
    longest (the one starting earliest) wins. The released text is then everything before that stop string.
    This equals cutting the full text at the first occurrence of any stop string, except when a stop string
    sits strictly inside a longer one (e.g. "bc" in "abcd"): the short one completes first and stops generation
    at once instead of waiting for more tokens.

    Held-back text (a suffix that may still grow into a stop string) is at most `max(len(stop)) - 1` characters
    and is released as soon as it can no longer match, or by `flush()` at the end of generation.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        stops = (stops,) if isinstance(stops, str) else tuple(stops)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r} in {stops!r}")
        self._build(stops)
        self._state = 0  # automaton node = the longest suffix of the text that is a prefix of a stop string
        self._held = ""  # that suffix: text not released yet
        self._stopped = False

    def _build(self, stops: tuple[str, ...]) -> None:
        # Trie over the stop strings; node 0 is the root (the empty string).
        self._goto: list[dict[str, int]] = [{}]
        depth = [0]
        ends = [0]  # length of the stop string ending exactly at this node, 0 if none
        for s in stops:
            node = 0
            for ch in s:
                if ch not in self._goto[node]:
                    self._goto.append({})
                    depth.append(depth[node] + 1)
                    ends.append(0)
                    self._goto[node][ch] = len(self._goto) - 1
                node = self._goto[node][ch]
            ends[node] = len(s)
        # Breadth-first: failure link = node of the longest proper suffix that is also in the trie.
        self._fail = [0] * len(self._goto)
        self._match = list(ends)  # longest stop string that is a suffix of this node's string
        queue = list(self._goto[0].values())
        for node in queue:
            for ch, child in self._goto[node].items():
                self._fail[child] = self._next(self._fail[node], ch) if node else 0
                self._match[child] = ends[child] or self._match[self._fail[child]]
                queue.append(child)
        self._depth = depth

    def _next(self, node: int, ch: str) -> int:
        # Amortised O(1): each failure hop shortens the match that earlier characters lengthened.
        while node and ch not in self._goto[node]:
            node = self._fail[node]
        return self._goto[node].get(ch, 0)

    @property
    def stopped(self) -> bool:
        """True once a stop string has completed; later pushes release nothing."""
        return self._stopped

    def push(self, delta: str) -> tuple[str, bool]:
        """Consume `delta`; return (text safe to release now, whether a stop string completed)."""
        if self._stopped:
            return "", True
        if len(self._goto) == 1:  # no stop strings
            return delta, False
        node = self._state
        for i, ch in enumerate(delta):
            node = self._next(node, ch)
            matched = self._match[node]
            if matched:
                text = self._held + delta[: i + 1]
                self._held, self._state, self._stopped = "", 0, True
                return text[: len(text) - matched], True
        text = self._held + delta
        keep = self._depth[node]
        self._state = node
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Release the held-back text at the end of generation ("" after a stop) and start afresh."""
        held, self._held, self._state = self._held, "", 0
        return held
