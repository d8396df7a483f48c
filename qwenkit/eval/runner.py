"""The shared runner: batched greedy generation of every question, resumable JSONL records, the summary.

Questions of all subjects are sorted by prompt length and generated `batch_size` at a time through
`generate_batch` (one batched forward per step); each response equals what `model.chat(tokenizer, prompt)`
gives with the official eval settings (greedy, repetition_penalty 1.0, default system prompt). Records are
appended per subject after every batch, so an interrupted run loses nothing already finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..generation.chat import prepare_chat
from ..generation.generate import CacheReuse, generate_batch
from ..generation.protocol import CausalLM
from ..tokenizer.chat_format import DEFAULT_SYSTEM
from ..tokenizer.tokenization import QWenTokenizer
from .task import Question, Record, Task


@dataclass(frozen=True)
class RunResult:
    task: str
    figures: dict[str, float]
    questions: int
    generated: int  # questions generated in this run (the others were reused from earlier records)
    wall_seconds: float
    out_dir: Path

    @property
    def questions_per_second(self) -> float:
        return self.generated / self.wall_seconds if self.wall_seconds > 0 else 0.0


def eval_settings(max_new_tokens: int | None) -> dict[str, Any]:
    """The official scripts' generation overrides: greedy, no repetition penalty."""
    settings: dict[str, Any] = {"do_sample": False, "repetition_penalty": 1.0}
    if max_new_tokens is not None:
        settings["max_new_tokens"] = max_new_tokens
    return settings


def chat_responses(
    model: CausalLM,
    tokenizer: QWenTokenizer,
    prompts: Sequence[str],
    max_new_tokens: int | None = None,
    reuse: CacheReuse | None = None,
) -> list[str]:
    """Responses to several chat queries in one batch, each equal to `model.chat(...)` with the eval settings;
    `reuse` lends successive batches one KV cache."""
    prepared = [
        prepare_chat(model, tokenizer, p, None, DEFAULT_SYSTEM, None, None, eval_settings(max_new_tokens))
        for p in prompts
    ]
    results = generate_batch(model, tokenizer, [ids for ids, _ in prepared], [params for _, params in prepared],
                             errors="replace", reuse=reuse)  # fmt: skip
    return [r.text.strip() for r in results]


class RecordStore:
    """`OUT/{subject}.jsonl` per subject plus `OUT/run.json` (the settings the records were made with)."""

    def __init__(self, out_dir: Path, settings: Mapping[str, Any], overwrite: bool) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        run_file = self.dir / "run.json"
        if overwrite:
            for old in self.dir.glob("*.jsonl"):
                old.unlink()
        elif run_file.exists():
            before = json.loads(run_file.read_text(encoding="utf-8"))
            if before != dict(settings):
                changed = sorted(k for k in {*before, *settings} if before.get(k) != settings.get(k))
                raise ValueError(
                    f"{self.dir} holds records made with other settings ({', '.join(changed)} differ); "
                    "pass --overwrite to redo them, or choose another --out"
                )
        run_file.write_text(json.dumps(dict(settings), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def path(self, subject: str) -> Path:
        return self.dir / f"{subject.replace('/', '_')}.jsonl"

    def load(self, subject: str) -> dict[str, Record]:
        path = self.path(subject)
        if not path.exists():
            return {}
        records = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by an interruption: that question is generated again
            records[record["id"]] = record
        return records

    def append(self, subject: str, records: Sequence[Record]) -> None:
        with open(self.path(subject), "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


def run_task(
    model: CausalLM,
    tokenizer: QWenTokenizer,
    task: Task,
    questions: Mapping[str, Sequence[Question]],
    out_dir: Path,
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    overwrite: bool = False,
    settings: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> RunResult:
    """Generate, score and store every question not yet recorded in `out_dir`; return the figures.

    `settings` (model, dtype, ...) are stored beside the records; a rerun with other settings is refused
    unless `overwrite`. Records are matched by question id and prompt, so changed data is generated again.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    store = RecordStore(out_dir, {**(settings or {}), **task.options, "max_new_tokens": max_new_tokens,
                                  "task": task.name}, overwrite)  # fmt: skip
    done: dict[str, dict[str, Record]] = {}
    todo: list[Question] = []
    for subject, items in questions.items():
        old = store.load(subject)
        done[subject] = {
            q.id: old[q.id] for q in items if q.id in old and old[q.id].get("prompt") == q.prompt
        }
        todo += [q for q in items if q.id not in done[subject]]
    total = sum(len(items) for items in questions.values())
    start = time.perf_counter()
    _generate_all(model, tokenizer, task, todo, store, done, batch_size, max_new_tokens, total, progress)
    wall = time.perf_counter() - start
    records = {s: [done[s][q.id] for q in items] for s, items in questions.items()}
    return RunResult(task.name, task.summarize(records), total, len(todo), wall, store.dir)


def _generate_all(
    model: CausalLM, tokenizer: QWenTokenizer, task: Task, todo: list[Question], store: RecordStore,
    done: dict[str, dict[str, Record]], batch_size: int, max_new_tokens: int | None, total: int, progress: bool,
) -> None:  # fmt: skip
    from tqdm import tqdm

    # Longest prompts first: similar lengths share a batch (little padding) and the peak memory shows at once.
    lengths = {q.id: len(tokenizer.encode(q.prompt, allowed_special=set())) for q in todo}
    todo = sorted(todo, key=lambda q: -lengths[q.id])
    finished = sum(len(d) for d in done.values())
    hits = sum(r["correct"] for d in done.values() for r in d.values())
    bar = tqdm(
        total=total, initial=finished, unit="q", desc=task.name, disable=not progress, dynamic_ncols=True
    )
    reuse = CacheReuse()  # the first (longest) batch's cache serves the rest
    with bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            responses = chat_responses(model, tokenizer, [q.prompt for q in batch], max_new_tokens, reuse)
            by_subject: dict[str, list[Record]] = {}
            for q, response in zip(batch, responses, strict=True):
                record = {"id": q.id, "subject": q.subject, "prompt": q.prompt, "response": response,
                          **task.score(q, response), "gold": q.gold}  # fmt: skip
                by_subject.setdefault(q.subject, []).append(record)
                done[q.subject][q.id] = record
                hits += bool(record["correct"])
            for subject, records in by_subject.items():
                store.append(subject, records)
            finished += len(batch)
            bar.set_postfix(acc=f"{100 * hits / finished:.1f}%")
            bar.update(len(batch))
