"""HumanEval (pass@1, greedy): exactly `eval/evaluate_chat_humaneval.py` of QwenLM/Qwen, scored by execution.

Prompt: "Write a Python function `{signature}` to solve the following problem:" + the docstring's lines
(stripped) + the original prompt. The function body is extracted with the official three regexes (else the
whole response, indented); `prompt + body + test + check(entry_point)` runs in a sandbox (`execution.py`).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping, Sequence

from .data import find_data, load_hub, read_jsonl, require_fields
from .execution import run_program
from .task import LoadOptions, Question, Record, Task, percent, take

FIELDS = ("task_id", "prompt", "entry_point", "test")
HOW_TO_GET = (
    "Get it with: wget https://github.com/openai/human-eval/raw/master/data/HumanEval.jsonl.gz\n"
    "Expected layout: DIR/HumanEval.jsonl or DIR/HumanEval.jsonl.gz (fields task_id, prompt, entry_point, test)."
)


def format_prompt(prompt: str, entry_point: str) -> str:
    """The official chat prompt (humanevalpack style) for one problem."""
    signature = re.search(rf"def\s+({entry_point}.*?):\s*\n", prompt)
    docstring = re.search(r"(?:\"\"\"|''')(.*?)(?:\"\"\"|''')", prompt, re.DOTALL)
    if signature is None or docstring is None:
        raise ValueError(f"HumanEval prompt without a `def {entry_point}(...)` signature or a docstring")
    description = "\n".join(line.strip() for line in docstring.group(1).split("\n"))
    return (
        f"Write a Python function `{signature.group(1)}` to solve the following problem:\n"
        f"{description}\n"
        f"{prompt}"
    )


def extract_code(text: str, entry_point: str) -> str:
    """The official `extract_code`: the body of `entry_point` (fenced, then bare, then any def), else the text
    indented by four spaces."""
    patterns = (
        rf"```(?:[Pp]ython\n)?.*?def\s+{entry_point}.*?:\n(.*?)\n```",
        rf"def\s+{entry_point}.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)",
        r"def.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)",
    )
    for pattern in patterns:
        block = re.search(pattern, text, re.DOTALL)
        if block is not None:
            return block.group(1)
    return textwrap.indent(text, " " * 4)


def check_program(problem: Mapping[str, str], completion: str) -> str:
    """The program human-eval's `check_correctness` runs."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def _load(options: LoadOptions) -> dict[str, list[Question]]:
    if options.subjects and list(options.subjects) != ["main"]:
        raise ValueError("HumanEval has no subjects; drop --subjects")
    if options.data_dir is None:
        rows, source = load_hub("openai_humaneval", None, "test", HOW_TO_GET), "openai_humaneval (hub)"
    else:
        candidates = ["HumanEval.jsonl", "HumanEval.jsonl.gz", "humaneval/HumanEval.jsonl",
                      "humaneval/HumanEval.jsonl.gz", ""]  # fmt: skip
        path = find_data(options.data_dir, candidates, "HumanEval.jsonl", HOW_TO_GET)
        if path.is_dir():
            raise FileNotFoundError(f"no HumanEval.jsonl(.gz) in {path}. {HOW_TO_GET}")
        rows, source = list(read_jsonl(path)), str(path)
    questions = []
    for row in rows:
        require_fields(row, FIELDS, source)
        problem = {k: row[k] for k in FIELDS}
        prompt = format_prompt(row["prompt"], row["entry_point"])
        questions.append(Question(row["task_id"], "main", prompt, "passes its tests", problem))
    return {"main": take(questions, options.limit)}


def make_task(timeout: float = 3.0, memory_mb: int = 1024) -> Task:
    """HumanEval with the sandbox's wall-clock `timeout` per sample (human-eval's default 3 s) and memory cap."""

    def score(question: Question, response: str) -> Record:
        completion = extract_code(response, question.meta["entry_point"])
        outcome = run_program(check_program(question.meta, completion), timeout, memory_mb)
        return {"pred": completion, "correct": outcome.passed, "result": outcome.result}

    return Task("humaneval", "HumanEval (pass@1, greedy)", _load, score, summarize, headline="pass@1")


def summarize(records: Mapping[str, Sequence[Record]]) -> dict[str, float]:
    recs = [r for rs in records.values() for r in rs]
    return {"pass@1": percent(sum(r["correct"] for r in recs), len(recs))}


TASK = make_task()
