"""The summary of a run: `summary.json` and `summary.md` beside the records, and the model card's figures.

The card's figures are those of the Qwen README (quantization table: BF16 / Int8 / Int4 of each size, chat
models, the official zero-shot scripts; tool use: the ReAct plugin benchmark v20231206, BF16).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .runner import RunResult

# (MMLU, C-Eval val, GSM8K, HumanEval) per model and precision, from the Qwen README's quantization table.
CARD: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "1.8B": {"BF16": (43.3, 55.6, 33.7, 26.2), "Int8": (43.1, 55.8, 33.0, 27.4), "Int4": (42.9, 52.8, 31.2, 25.0)},
    "7B": {"BF16": (55.8, 59.7, 50.3, 37.2), "Int8": (55.4, 59.4, 48.3, 34.8), "Int4": (55.1, 59.2, 49.7, 29.9)},
    "14B": {"BF16": (64.6, 69.8, 60.1, 43.9), "Int8": (63.6, 68.6, 60.0, 48.2), "Int4": (63.3, 69.0, 59.8, 45.7)},
    "72B": {"BF16": (74.4, 80.1, 76.4, 64.6), "Int8": (73.5, 80.1, 73.5, 62.2), "Int4": (73.4, 80.1, 75.3, 61.6)},
}  # fmt: skip
# Tool selection %, tool input Rouge-L, false positive % (BF16).
CARD_TOOLS = {"1.8B": (85.0, 0.839, 27.6), "7B": (95.5, 0.900, 11.6), "14B": (96.9, 0.917, 5.6),
              "72B": (98.2, 0.927, 1.1)}  # fmt: skip
_COLUMN = {"mmlu": 0, "ceval": 1, "gsm8k": 2, "humaneval": 3}
_TOOL_KEYS = ("tool_selection_acc", "tool_input_rouge_l", "false_positive_rate")


def model_size(num_hidden_layers: int, hidden_size: int) -> str | None:
    """The Qwen v1 size a config describes, or None (e.g. the tiny test preset)."""
    return {(24, 2048): "1.8B", (32, 4096): "7B", (40, 5120): "14B", (80, 8192): "72B"}.get(
        (num_hidden_layers, hidden_size)
    )


def precision_name(dtype: str, quantize: str | None) -> str:
    """The card's row for a run: Int8/Int4 when quantized, else BF16 (fp32/fp16 are compared with BF16)."""
    return {"int8": "Int8", "int4": "Int4"}.get(quantize or "", "BF16")


def card_figures(task: str, size: str | None, precision: str) -> dict[str, float]:
    """The card's figures for the same task, model size and precision ({} when the card has none)."""
    if size is None:
        return {}
    if task == "tools":
        return dict(zip(_TOOL_KEYS, CARD_TOOLS[size], strict=True)) if precision == "BF16" else {}
    key = {"mmlu": "AVERAGE", "ceval": "AVERAGE", "gsm8k": "accuracy", "humaneval": "pass@1"}[task]
    return {key: CARD[size][precision][_COLUMN[task]]}


def markdown(result: RunResult, title: str, card: dict[str, float], card_label: str) -> str:
    """A table of every figure (subjects last), with the card's value beside the ones it reports."""
    lines = [f"### {title}", "", f"| figure | qwenkit | {card_label} |", "|---|---|---|"]
    for key, value in result.figures.items():
        ref = card.get(key)
        lines.append(f"| {key} | {_fmt(key, value)} | {_fmt(key, ref) if ref is not None else ''} |")
    lines += ["", f"{result.questions} questions ({result.generated} generated in this run) in "
              f"{result.wall_seconds:.1f} s ({result.questions_per_second:.2f} questions/s)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _fmt(key: str, value: float) -> str:
    return f"{value:.3f}" if key == "tool_input_rouge_l" else f"{value:.2f}"


def write_summary(result: RunResult, title: str, settings: dict[str, Any], card: dict[str, float],
                  card_label: str) -> str:  # fmt: skip
    """Write `summary.json` and `summary.md` into the run's directory; return the markdown."""
    text = markdown(result, title, card, card_label)
    summary = {
        "task": result.task, "title": title, "figures": result.figures, "card": card, "card_label": card_label,
        "questions": result.questions, "generated": result.generated, "wall_seconds": result.wall_seconds,
        "questions_per_second": result.questions_per_second, "settings": settings,
    }  # fmt: skip
    Path(result.out_dir, "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    Path(result.out_dir, "summary.md").write_text(text, encoding="utf-8")
    return text
