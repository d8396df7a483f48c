"""MMLU, zero-shot, on the test split: exactly `eval/evaluate_chat_mmlu.py` of QwenLM/Qwen.

Prompt: the official instruction, the question and the A-D option lines. Extraction: every option's text
(case-insensitive, trailing "." dropped, longest first) replaced by its letter, then the four-regex cascade and
the thefuzz fallback. Figures: accuracy pooled over the questions of each group and over all (`cal_mmlu`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .choice import CHOICES, extract_choice, letter_scorer, options_text
from .data import find_data, load_hub, read_csv
from .task import LoadOptions, Question, Record, Task, percent, select_subjects, take

GROUPS: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "Humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ),
    "other": (
        "business_ethics", "college_medicine", "human_aging", "management", "marketing", "medical_genetics",
        "miscellaneous", "nutrition", "professional_accounting", "professional_medicine", "virology",
        "global_facts", "clinical_knowledge",
    ),
    "social": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
}  # fmt: skip
SUBJECTS: tuple[str, ...] = tuple(s for names in GROUPS.values() for s in names)
COLUMNS = ("question", "A", "B", "C", "D", "answer")
INSTRUCTION = (
    "The following is a multiple-choice question. Please choose the most suitable one among A, B, C and D "
    "as the answer to this question.\n\n"
)
PATTERNS = tuple(
    re.compile(p)
    for p in (
        r"(?:(?:[Cc]hoose)|(?:(?:[Aa]nswer|[Cc]hoice)(?![^ABCD]{0,20}?(?:n't|not))[^ABCD]{0,10}?\b(?:|is|:|be))\b)[^ABCD]{0,20}?\b(A|B|C|D)\b",
        r"\b(A|B|C|D)\b(?![^ABCD]{0,8}?(?:n't|not)[^ABCD]{0,5}?(?:correct|right))[^ABCD]{0,10}?\b(?:correct|right)\b",
        r"^(A|B|C|D)(?:\.|,|:|$)",
        r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",
    )
)
HOW_TO_GET = (
    "Get it with: wget https://people.eecs.berkeley.edu/~hendrycks/data.tar && mkdir -p data/mmlu && "
    "tar xf data.tar -C data/mmlu\n"
    "Expected layout: DIR/test/{subject}_test.csv (no header; question,A,B,C,D,answer), DIR being "
    "data/mmlu/data (or data/mmlu, or its parent)."
)


def format_prompt(row: Mapping[str, str]) -> str:
    """The official `format_example`: instruction, question, then 'A. ...' to 'D. ...'."""
    return INSTRUCTION + row["question"] + "\n" + options_text(row)


def process_before_extraction(gen: str, choice_dict: Mapping[str, str]) -> str:
    for key, val in sorted(choice_dict.items(), key=lambda x: len(x[1]), reverse=True):
        gen = re.compile(re.escape(val.rstrip(".")), re.IGNORECASE).sub(key, gen)
    return gen


def extract_answer(response: str, row: Mapping[str, str]) -> str:
    """The official `extract_answer`: the letter MMLU's script reads from a response."""
    gen = process_before_extraction(response, {c: row[c] for c in CHOICES})
    return extract_choice(gen, PATTERNS, [row[c] for c in CHOICES])


def _load(options: LoadOptions) -> dict[str, list[Question]]:
    subjects = select_subjects(SUBJECTS, options.subjects, "MMLU")
    out: dict[str, list[Question]] = {}
    if options.data_dir is None:
        for subject in subjects:
            rows = [
                {"question": r["question"], **dict(zip(CHOICES, map(str, r["choices"]), strict=True)),
                 "answer": CHOICES[int(r["answer"])]}
                for r in load_hub("cais/mmlu", subject, "test", HOW_TO_GET)
            ]  # fmt: skip
            out[subject] = take(_questions(subject, rows), options.limit)
        return out
    root = find_data(options.data_dir, ["test", "data/test", "mmlu/data/test"], "MMLU test split", HOW_TO_GET)
    for subject in subjects:
        path = Path(root) / f"{subject}_test.csv"
        if not path.exists():
            raise FileNotFoundError(f"MMLU file {path} is missing. {HOW_TO_GET}")
        out[subject] = take(_questions(subject, read_csv(path, COLUMNS)), options.limit)
    return out


def _questions(subject: str, rows: list[dict[str, str]]) -> list[Question]:
    return [
        Question(
            id=f"{subject}/{i}",
            subject=subject,
            prompt=format_prompt(row),
            gold=row["answer"],
            meta={c: row[c] for c in CHOICES},
        )  # fmt: skip
        for i, row in enumerate(rows)
    ]


def summarize(records: Mapping[str, Sequence[Record]]) -> dict[str, float]:
    """The official `cal_mmlu`: accuracy pooled over questions, per group and overall (AVERAGE)."""
    out: dict[str, float] = {}
    hits = total = 0
    for group, names in GROUPS.items():
        g_hits = sum(r["correct"] for s in names for r in records.get(s, ()))
        g_total = sum(len(records.get(s, ())) for s in names)
        if g_total:
            out[group] = percent(g_hits, g_total)
        hits, total = hits + g_hits, total + g_total
    out["AVERAGE"] = percent(hits, total)
    for s, recs in records.items():
        if recs:
            out[f"subject/{s}"] = percent(sum(r["correct"] for r in recs), len(recs))
    return out


TASK = Task(
    "mmlu", "MMLU (test, zero-shot)", _load, letter_scorer(extract_answer), summarize, headline="AVERAGE"
)
