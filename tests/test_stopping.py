"""StopStringMatcher: released text is the text before the first completed stop string, whatever the deltas."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qwenkit.generation.stopping import StopStringMatcher


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Straightforward restatement: walk the text; at the first character where some stop string ends, cut before
    the longest one ending there."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[: end - max(map(len, ending))], True
    return text, False


def run(stops: list[str], deltas: list[str]) -> tuple[str, bool, int]:
    """Feed deltas; return (all released text, stopped, largest held-back length seen)."""
    matcher = StopStringMatcher(stops)
    released, fed, most_held, stopped = "", 0, 0, False
    for delta in deltas:
        safe, stopped = matcher.push(delta)
        released += safe
        fed += len(delta)
        if stopped:
            break
        most_held = max(most_held, fed - len(released))
    if not stopped:
        released += matcher.flush()
    return released, stopped, most_held


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:], strict=False)]


alphabet = st.sampled_from("ab\nxé😀")
texts = st.text(alphabet, max_size=40)
stop_lists = st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3)
cut_lists = st.lists(st.integers(0, 40), max_size=12)


@settings(max_examples=300, deadline=None)
@given(text=texts, stops=stop_lists, cuts=cut_lists)
def test_released_text_matches_reference_for_any_split(text, stops, cuts):
    released, stopped, most_held = run(stops, split(text, cuts))
    assert (released, stopped) == reference(text, stops)
    assert released == run(stops, list(text))[0] == run(stops, [text])[0]
    assert most_held <= max(map(len, stops)) - 1


@settings(max_examples=300, deadline=None)
@given(text=texts, stops=stop_lists, cuts=cut_lists)
def test_cut_at_first_occurrence_when_no_stop_contains_another(text, stops, cuts):
    assume(not any(a != b and a in b for a in stops for b in stops))
    released, stopped, _ = run(stops, split(text, cuts))
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert released == (text[: min(hits)] if hits else text)
    assert stopped == bool(hits)


@settings(max_examples=300, deadline=None)
@given(text=texts, stops=stop_lists, cuts=cut_lists)
def test_no_part_of_a_completed_stop_string_is_released(text, stops, cuts):
    released, stopped, _ = run(stops, split(text, cuts))
    assert not any(s in released for s in stops)
    if stopped:
        # What follows the released text starts with a stop string.
        assert any(text[len(released) :].startswith(s) for s in stops)


def test_stop_string_spanning_deltas():
    matcher = StopStringMatcher(["Observation:"])
    assert matcher.push("Thought: x\nObs") == ("Thought: x\n", False)
    assert matcher.push("erva") == ("", False)
    assert matcher.push("tion: 42") == ("", True)
    assert matcher.stopped
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


def test_held_text_released_as_soon_as_match_fails():
    matcher = StopStringMatcher(["abc"])
    assert matcher.push("xab") == ("x", False)
    assert matcher.push("d") == ("abd", False)
    assert matcher.push("a") == ("", False)
    assert matcher.flush() == "a"


def test_overlapping_candidates_restart_inside_held_text():
    # "aab" must be found although the first "aa" looked like the start of "aab" for one character too long.
    assert run(["aab"], list("xaaab")) == ("xa", True, 2)


def test_longest_stop_wins_when_several_end_together():
    assert run(["Observation:", "\nObservation:"], ["a\nObservation: b"])[:2] == ("a", True)


def test_shorter_stop_inside_a_longer_one_stops_at_once():
    # "bc" completes before "abcd" could; generation stops there instead of waiting for "d".
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.push("ab") == ("", False)
    assert matcher.push("c") == ("a", True)


def test_no_stop_strings_passes_text_through():
    matcher = StopStringMatcher([])
    assert matcher.push("abc") == ("abc", False)
    assert matcher.flush() == ""


def test_a_bare_string_is_one_stop_string():
    assert run("ab", ["xxab"])[:2] == ("xx", True)


@pytest.mark.parametrize("stops", [[""], ["ok", ""], [None], [3]])
def test_bad_stop_strings_rejected(stops):
    with pytest.raises(ValueError, match="non-empty strings"):
        StopStringMatcher(stops)


def test_long_text_keeps_held_text_bounded():
    stops = ["<|im_end|>", "<|endoftext|>"]
    text = "<|im_en" * 5_000 + "<|im_end|>tail"
    released, stopped, most_held = run(stops, list(text))
    assert (released, stopped) == ("<|im_en" * 5_000, True)
    assert most_held <= len("<|endoftext|>") - 1
