"""What C-Eval and MMLU share: the A-D options, the official regex cascade runner and the thefuzz fallback.

Each task supplies its own regexes and pre-extraction step (they differ between the two official scripts);
this module only runs them in order exactly as `extract_choice` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from .task import Question, Record

CHOICES = ("A", "B", "C", "D")


def options_text(row: Mapping[str, str]) -> str:
    """The official option lines: f'{choice}. {text}\\n' for A-D."""
    return "".join(f"{c}. {row[c]}\n" for c in CHOICES)


def first_match(patterns: Sequence[re.Pattern[str]], gen: str) -> str | None:
    """Group 1 of the first pattern (in order) that `re.search` finds in `gen`, else None."""
    for pattern in patterns:
        match = pattern.search(gen)
        if match is not None:
            return match.group(1)
    return None


def fuzzy_choice(gen: str, choice_list: Sequence[str]) -> str:
    """The official fallback: the letter of the option text closest to `gen` (thefuzz `process.extractOne`)."""
    try:
        from thefuzz import process
    except ImportError as exc:
        raise ValueError("the official answer extraction needs thefuzz: pip install 'qwenkit[eval]'") from exc
    best = process.extractOne(gen, list(choice_list))
    return CHOICES[list(choice_list).index(best[0])]


def extract_choice(gen: str, patterns: Sequence[re.Pattern[str]], choice_list: Sequence[str]) -> str:
    """The regex cascade, then the fuzzy fallback (the official `extract_choice`)."""
    found = first_match(patterns, gen)
    return found if found is not None else fuzzy_choice(gen, choice_list)


def letter_scorer(
    extract_answer: Callable[[str, Mapping[str, str]], str],
) -> Callable[[Question, str], Record]:
    """A task's `score`: the letter `extract_answer` reads from the response, right when it equals the gold one."""

    def score(question: Question, response: str) -> Record:
        pred = extract_answer(response, question.meta)
        return {"pred": pred, "correct": pred == question.gold}

    return score
