"""What every evaluation task provides to the shared runner: questions, scoring of one response, a summary.

A task module (ceval, mmlu, gsm8k, humaneval, tools) builds a `Task`; the runner (`runner.py`) generates the
responses in batches, stores the records and calls back into the task. Tasks know nothing about models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Record = dict[str, Any]  # one JSONL line: id, prompt, response, pred, gold, correct (+ task-specific fields)


@dataclass(frozen=True)
class Question:
    """One chat query: `prompt` is what the official script passes to `model.chat(tokenizer, prompt)`."""

    id: str
    subject: str
    prompt: str
    gold: Any
    meta: Mapping[str, Any] = field(default_factory=dict)  # what scoring needs: choices, tests, ...


@dataclass(frozen=True)
class LoadOptions:
    """How to find and select questions: `limit` caps the questions per subject (the first N, in file order)."""

    data_dir: Path | None = None
    subjects: Sequence[str] | None = None
    limit: int | None = None
    fewshot: bool = False  # GSM8K: the official 4-shot prompt instead of zero-shot


@dataclass(frozen=True)
class Task:
    """An evaluation task: `load` gives questions per subject, `score` one record's fields, `summarize` figures.

    `score(question, response)` returns at least `pred` and `correct` (bool), JSON-serialisable.
    `summarize(records_by_subject)` returns the figures (percentages, as the official scripts print them);
    `headline` names the one the model card reports.
    """

    name: str
    title: str
    load: Callable[[LoadOptions], dict[str, list[Question]]]
    score: Callable[[Question, str], Record]
    summarize: Callable[[Mapping[str, Sequence[Record]]], dict[str, float]]
    headline: str
    options: Mapping[str, Any] = field(default_factory=dict)  # task settings that change the records


def select_subjects(all_subjects: Sequence[str], wanted: Sequence[str] | None, task: str) -> list[str]:
    """The subjects to run, in the official order; an unknown name is an error listing the valid ones."""
    if not wanted:
        return list(all_subjects)
    unknown = [s for s in wanted if s not in all_subjects]
    if unknown:
        raise ValueError(f"unknown {task} subject(s) {unknown}; valid subjects: {', '.join(all_subjects)}")
    return [s for s in all_subjects if s in set(wanted)]


def take(items: list[Question], limit: int | None) -> list[Question]:
    return items if limit is None else items[:limit]


def percent(hits: int | float, total: int) -> float:
    return 100.0 * hits / total if total else 0.0
