"""Tool use (ReAct): exactly `eval/evaluate_plugin.py` of QwenLM/Qwen on the plugin benchmark files.

Positives: tool selection accuracy ("\\nAction: " present and the action equal after strip().lower()) and the
Rouge-L F of the action inputs (JSON normalised by json5, tokenized by the Qwen tokenizer, tokens space-joined).
Negatives: the false-positive rate (responses containing "\\nAction: "). The prompts already hold the ReAct text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from ..tokenizer.tokenization import QWenTokenizer
from .data import find_data, read_jsonl, require_fields
from .task import LoadOptions, Question, Record, Task, percent, take

FILES = {
    "positive": "exam_plugin_v20231206_react_positive.jsonl",
    "negative": "exam_plugin_v20231206_react_negative.jsonl",
}
HOW_TO_GET = (
    "The files ship with the Qwen repository's evaluation data (eval/data of github.com/QwenLM/Qwen; see "
    "eval/EVALUATION.md there).\nExpected layout: DIR/exam_plugin_v20231206_react_positive.jsonl and "
    'DIR/exam_plugin_v20231206_react_negative.jsonl, one {"prompt", "response"} per line.'
)


def process_res(response: str) -> dict[str, str]:
    """The official `process_res`: ReAct fields by str.find (the action input normalised by json5, or "")."""
    response += "\n"
    action = response[response.find("Action:") + len("Action:") : response.find("Action Input:")].strip()
    action_input = response[
        response.find("Action Input:") + len("Action Input:") : response.find("Observation:")
    ].strip()
    try:
        import json5
    except ImportError as exc:
        raise ValueError("the tool-use evaluation needs json5: pip install 'qwenkit[eval]'") from exc
    try:
        action_input = json.dumps(json5.loads(action_input), ensure_ascii=False, sort_keys=True)
    except Exception:  # the official script maps every parse failure to ""
        action_input = ""
    return {"action": action, "action_input": action_input}


def is_callable(gen: str, golden: str) -> bool:
    """Tool selection: the response names an action and it is the reference's action."""
    if "\nAction: " not in gen:
        return False
    return process_res(gen)["action"].strip().lower() == process_res(golden)["action"].strip().lower()


def tokenized_string(tokenizer: QWenTokenizer, text: str) -> str:
    """Qwen tokens of `text` (each token's bytes decoded with errors="replace"), space-joined."""
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(text))
    return " ".join(t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in tokens)


class _WhitespaceTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return text.split()


def action_input_rouge(tokenizer: QWenTokenizer, gen: str, golden: str) -> float:
    """Rouge-L F between the normalised action inputs of the response and of the reference."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise ValueError("the tool-use evaluation needs rouge_score: pip install 'qwenkit[eval]'") from exc
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())
    reference = tokenized_string(tokenizer, process_res(golden)["action_input"])
    candidate = tokenized_string(tokenizer, process_res(gen)["action_input"])
    return scorer.score(reference, candidate)["rougeL"].fmeasure


def _load(options: LoadOptions) -> dict[str, list[Question]]:
    subjects = list(FILES) if not options.subjects else list(options.subjects)
    unknown = [s for s in subjects if s not in FILES]
    if unknown:
        raise ValueError(f"unknown tool-use subject(s) {unknown}; valid: positive, negative")
    if options.data_dir is None:
        raise FileNotFoundError(f"the tool-use benchmark has no hub copy; pass --data DIR. {HOW_TO_GET}")
    out: dict[str, list[Question]] = {}
    for subject in subjects:
        path = find_data(
            options.data_dir, [FILES[subject], f"data/{FILES[subject]}"], FILES[subject], HOW_TO_GET
        )
        questions = []
        for i, row in enumerate(read_jsonl(path)):
            require_fields(row, ("prompt", "response"), str(path))
            questions.append(Question(f"{subject}/{i}", subject, row["prompt"], row["response"]))
        out[subject] = take(questions, options.limit)
    return out


def make_task(tokenizer: QWenTokenizer) -> Task:
    """The tool-use task; `tokenizer` tokenizes the action inputs for Rouge-L (the model's own, officially)."""

    def score(question: Question, response: str) -> Record:
        if question.subject == "negative":
            has_action = "\nAction: " in response
            return {"pred": "action" if has_action else "no action", "correct": not has_action}
        right = is_callable(response, question.gold)
        pred = process_res(response)
        return {"pred": pred["action"], "pred_input": pred["action_input"], "correct": right,
                "rouge_l": action_input_rouge(tokenizer, response, question.gold)}  # fmt: skip

    return Task("tools", "Tool use (ReAct plugin benchmark v20231206)", _load, score, summarize,
                headline="tool_selection_acc")  # fmt: skip


def summarize(records: Mapping[str, Sequence[Record]]) -> dict[str, float]:
    """The official figures: selection accuracy and mean Rouge-L over positives, false-positive rate over negatives."""
    out: dict[str, float] = {}
    positive, negative = records.get("positive", ()), records.get("negative", ())
    if positive:
        out["tool_selection_acc"] = percent(sum(r["correct"] for r in positive), len(positive))
        rouge_mean = 0.0
        for r in positive:  # summed as the official script does
            rouge_mean += r["rouge_l"] / len(positive)
        out["tool_input_rouge_l"] = rouge_mean
    if negative:
        out["false_positive_rate"] = percent(sum(not r["correct"] for r in negative), len(negative))
    return out
