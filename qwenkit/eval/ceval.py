"""C-Eval, zero-shot, on the val split: exactly `eval/evaluate_chat_ceval.py` of QwenLM/Qwen.

Prompt: question, blank line, the A-D option lines. Extraction: `process_before_extraction` (the question's text
and each option's text replaced by the answer letter, longest option first), then the four-regex cascade and the
thefuzz fallback. Figures: per-subject accuracy, unweighted means per category, "Hard" and AVERAGE.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .choice import CHOICES, extract_choice, letter_scorer, options_text
from .data import find_data, load_hub, read_csv
from .task import LoadOptions, Question, Record, Task, percent, select_subjects, take

CATEGORIES: dict[str, tuple[str, ...]] = {
    "STEM": (
        "computer_network", "operating_system", "computer_architecture", "college_programming", "college_physics",
        "college_chemistry", "advanced_mathematics", "probability_and_statistics", "discrete_mathematics",
        "electrical_engineer", "metrology_engineer", "high_school_mathematics", "high_school_physics",
        "high_school_chemistry", "high_school_biology", "middle_school_mathematics", "middle_school_biology",
        "middle_school_physics", "middle_school_chemistry", "veterinary_medicine",
    ),
    "Social Science": (
        "college_economics", "business_administration", "marxism", "mao_zedong_thought", "education_science",
        "teacher_qualification", "high_school_politics", "high_school_geography", "middle_school_politics",
        "middle_school_geography",
    ),
    "Humanities": (
        "modern_chinese_history", "ideological_and_moral_cultivation", "logic", "law",
        "chinese_language_and_literature", "art_studies", "professional_tour_guide", "legal_professional",
        "high_school_chinese", "high_school_history", "middle_school_history",
    ),
    "Other": (
        "civil_servant", "sports_science", "plant_protection", "basic_medicine", "clinical_medicine",
        "urban_and_rural_planner", "accountant", "fire_engineer", "environmental_impact_assessment_engineer",
        "tax_accountant", "physician",
    ),
}  # fmt: skip
SUBJECTS: tuple[str, ...] = tuple(s for names in CATEGORIES.values() for s in names)  # the official order
HARD = (
    "advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_physics",
    "college_chemistry", "high_school_mathematics", "high_school_physics", "high_school_chemistry",
)  # fmt: skip

PATTERNS = tuple(
    re.compile(p)
    for p in (
        r"(?:(?:选|选择|选定)[：:]?\s*|(?:(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?(?:是|选|为|：|:|】))[^ABCD]{0,10}?(?:是|选|为|：|:|】))[^ABCD]{0,10}?)(A|B|C|D)(?:选项)?(?:\)|。|\.|，|,|．|、|A|B|C|D|$|：|:|\)|）)",
        r"(A|B|C|D)(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?(?:正确|对[的，。：]|符合))[^ABCD]{0,4}?(?:正确|对[的，。：]|符合)",
        r"^[\(（]?(A|B|C|D)(?:。|\)|）|\.|，|,|．|：|:|$)",
        r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",
    )
)
HOW_TO_GET = (
    "Get it with: wget https://huggingface.co/datasets/ceval/ceval-exam/resolve/main/ceval-exam.zip && "
    "mkdir -p data/ceval && unzip ceval-exam.zip -d data/ceval\n"
    "Expected layout: DIR/val/{subject}_val.csv (columns id,question,A,B,C,D,answer,explanation), "
    "DIR being data/ceval (or its parent)."
)


def format_prompt(row: Mapping[str, str]) -> str:
    """The official `format_example`: the question, a blank line, then 'A. ...' to 'D. ...'."""
    return row["question"] + "\n\n" + options_text(row)


def process_before_extraction(gen: str, question: str, choice_dict: Mapping[str, str]) -> str:
    """Replace the question's stem by "答案是" and its tail by "", then each option's text by its letter."""
    question_split = question.rstrip("。").split("。")[-1].split("_")
    if len(question_split[0].strip()) > 4:
        gen = gen.replace(question_split[0], "答案是")
    if len(question_split[-1].strip()) > 4:
        gen = gen.replace(question_split[-1], "")
    for key, val in sorted(choice_dict.items(), key=lambda x: len(x[1]), reverse=True):
        gen = gen.replace(val.rstrip("。"), key)
    return gen


def extract_answer(response: str, row: Mapping[str, str]) -> str:
    """The official `extract_answer`: the letter C-Eval's script reads from a response."""
    gen = process_before_extraction(response, row["question"], {c: row[c] for c in CHOICES})
    return extract_choice(gen, PATTERNS, [row[c] for c in CHOICES])


def _load(options: LoadOptions) -> dict[str, list[Question]]:
    subjects = select_subjects(SUBJECTS, options.subjects, "C-Eval")
    out: dict[str, list[Question]] = {}
    if options.data_dir is None:
        for subject in subjects:
            rows = [
                {k: str(v) for k, v in r.items()}
                for r in load_hub("ceval/ceval-exam", subject, "val", HOW_TO_GET)
            ]
            out[subject] = take(_questions(subject, rows), options.limit)
        return out
    root = find_data(options.data_dir, ["val", "ceval/val"], "C-Eval val split", HOW_TO_GET)
    for subject in subjects:
        path = Path(root) / f"{subject}_val.csv"
        if not path.exists():
            raise FileNotFoundError(f"C-Eval file {path} is missing. {HOW_TO_GET}")
        out[subject] = take(_questions(subject, read_csv(path)), options.limit)
    return out


def _questions(subject: str, rows: list[dict[str, str]]) -> list[Question]:
    for field in ("question", *CHOICES, "answer"):
        if rows and field not in rows[0]:
            raise ValueError(f"C-Eval {subject}: column {field!r} missing; expected question,A,B,C,D,answer")
    return [
        Question(
            id=str(row.get("id", i)),
            subject=subject,
            prompt=format_prompt(row),
            gold=row["answer"],
            meta={k: row[k] for k in ("question", *CHOICES)},
        )  # fmt: skip
        for i, row in enumerate(rows)
    ]


def summarize(records: Mapping[str, Sequence[Record]]) -> dict[str, float]:
    """The official `cal_ceval`: 100 * accuracy per subject, unweighted means per category, Hard and AVERAGE."""
    per_subject = {
        s: percent(sum(r["correct"] for r in recs), len(recs)) for s, recs in records.items() if recs
    }
    out: dict[str, float] = {}
    for category, names in CATEGORIES.items():
        scores = [per_subject[s] for s in names if s in per_subject]
        if scores:
            out[category] = sum(scores) / len(scores)
    hard = [per_subject[s] for s in HARD if s in per_subject]
    if hard:
        out["Hard"] = sum(hard) / len(hard)
    out["AVERAGE"] = sum(per_subject.values()) / len(per_subject) if per_subject else 0.0
    out.update({f"subject/{s}": v for s, v in per_subject.items()})
    return out


TASK = Task(
    "ceval", "C-Eval (val, zero-shot)", _load, letter_scorer(extract_answer), summarize, headline="AVERAGE"
)
