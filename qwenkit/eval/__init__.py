"""Evaluation exact to the official Qwen scripts (C-Eval, MMLU, GSM8K, HumanEval, tool use), batched.

`evaluate(model, tokenizer, "mmlu", data_dir=...)` loads the questions, generates and scores them through the
shared runner (resumable records in `out_dir`) and writes the summary beside the model card's figures.
One module per task; `runner` generates, `report` summarizes. See docs/eval.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..generation.protocol import CausalLM
from ..tokenizer.tokenization import QWenTokenizer
from . import ceval, gsm8k, humaneval, mmlu, tools
from .report import card_figures, model_size, precision_name, write_summary
from .runner import RunResult, run_task
from .task import LoadOptions, Question, Task

TASKS = ("ceval", "mmlu", "gsm8k", "humaneval", "tools")

__all__ = ["TASKS", "LoadOptions", "Question", "RunResult", "Task", "evaluate", "make_task", "precision_name"]


def make_task(name: str, tokenizer: QWenTokenizer, *, fewshot: bool = False, timeout: float = 3.0) -> Task:
    """The task called `name` (one of TASKS)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if fewshot and name != "gsm8k":
        raise ValueError("--fewshot is only defined for gsm8k (the official 4-shot prompt)")
    if name == "gsm8k":
        return gsm8k.make_task(fewshot)
    if name == "humaneval":
        return humaneval.make_task(timeout)
    if name == "tools":
        return tools.make_task(tokenizer)
    return {"ceval": ceval.TASK, "mmlu": mmlu.TASK}[name]


def evaluate(
    model: CausalLM,
    tokenizer: QWenTokenizer,
    task: str,
    *,
    data_dir: str | Path | None = None,
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
    out_dir: str | Path = "eval-results",
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    fewshot: bool = False,
    timeout: float = 3.0,
    overwrite: bool = False,
    settings: dict[str, Any] | None = None,
    precision: str = "BF16",
    progress: bool = True,
) -> tuple[RunResult, str]:
    """Run one task; return the result and its markdown table (also written to `out_dir/task/summary.md`).

    `data_dir` None fetches the Hugging Face dataset with `datasets` (online). `limit` caps questions per
    subject. `max_new_tokens` None keeps the model's generation config (512 for Qwen chat). `precision`
    (BF16, Int8, Int4) picks the card's row to compare with.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    the_task = make_task(task, tokenizer, fewshot=fewshot, timeout=timeout)
    options = LoadOptions(Path(data_dir) if data_dir is not None else None, subjects, limit, fewshot)
    questions = the_task.load(options)
    if not any(questions.values()):
        raise ValueError(f"no {task} questions found (check --data and --subjects)")
    result = run_task(
        model, tokenizer, the_task, questions, Path(out_dir) / task, batch_size=batch_size,
        max_new_tokens=max_new_tokens, overwrite=overwrite, settings=settings, progress=progress,
    )  # fmt: skip
    config = getattr(model, "config", None)
    size = model_size(config.num_hidden_layers, config.hidden_size) if config is not None else None
    card = card_figures(task, size, precision)
    label = f"card (Qwen-{size}-Chat {precision})" if size else "card (no figures for this model size)"
    text = write_summary(result, the_task.title, {**(settings or {}), "limit": limit}, card, label)
    return result, text
