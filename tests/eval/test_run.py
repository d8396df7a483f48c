"""The runner and `qwenkit eval` end to end: fixture data in the official layouts, canned and tiny-model answers."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from qwenkit.cli.commands import main
from qwenkit.eval import ceval, data, evaluate, mmlu, precision_name, runner
from qwenkit.eval.task import Question

SUBJECT_ROWS = [["What is 1+1?", "1", "2", "3", "None", "B"], ["Pick B", "x", "y", "z", "w", "B"]]


def write_fixtures(root: Path) -> Path:
    """Two questions per task in the official layouts."""
    (root / "mmlu" / "data" / "test").mkdir(parents=True)
    with open(root / "mmlu/data/test/abstract_algebra_test.csv", "w", newline="") as f:
        csv.writer(f).writerows(SUBJECT_ROWS)
    (root / "ceval" / "val").mkdir(parents=True)
    for subject in ("computer_network", "advanced_mathematics"):
        with open(root / f"ceval/val/{subject}_val.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
            w.writerows([[i, *row, ""] for i, row in enumerate(SUBJECT_ROWS)])
    (root / "gsm8k").mkdir()
    (root / "gsm8k/test.jsonl").write_text(
        "".join(json.dumps({"question": f"{i}+1?", "answer": f"so\n#### {i + 1}"}) + "\n" for i in range(2))
    )
    problem = {"task_id": "HumanEval/0", "prompt": 'def add(a, b):\n    """Add a and b."""\n',
               "entry_point": "add", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}  # fmt: skip
    with gzip.open(root / "HumanEval.jsonl.gz", "wt") as f:
        f.write(json.dumps(problem) + "\n")
    for kind in ("positive", "negative"):
        golden = 'Thought: t\nAction: search\nAction Input: {"q": "x"}\nObservation:'
        line = json.dumps({"prompt": "Answer the following questions ...\nQuestion: hi", "response": golden})
        (root / f"exam_plugin_v20231206_react_{kind}.jsonl").write_text(line + "\n" + line + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["make-checkpoint", str(out), "--preset", "tiny", "--dtype", "float32"]) == 0
    return out


@pytest.mark.parametrize(
    ("task", "data_rel", "figure"),
    [("mmlu", "mmlu/data", "AVERAGE"), ("ceval", "ceval", "AVERAGE"), ("gsm8k", "gsm8k", "accuracy"),
     ("humaneval", "", "pass@1"), ("tools", "", "tool_selection_acc")],
)  # fmt: skip
def test_cli_every_task_on_the_tiny_checkpoint(tiny_dir: Path, tmp_path: Path, task: str, data_rel: str,
                                               figure: str, capsys) -> None:  # fmt: skip
    root = write_fixtures(tmp_path / "data")
    subjects = {"mmlu": ["abstract_algebra"], "ceval": ["computer_network", "advanced_mathematics"]}
    argv = ["eval", "-m", str(tiny_dir), "--task", task, "--data", str(root / data_rel), "--out",
            str(tmp_path / "out"), "--max-new-tokens", "4", "--batch-size", "2", "--no-progress"]  # fmt: skip
    argv += ["--subjects", *subjects[task]] if task in subjects else []
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / task / "summary.json").read_text())
    assert figure in summary["figures"] and summary["questions"] >= 1
    assert f"| {figure} |" in capsys.readouterr().out
    records = [json.loads(line) for p in (tmp_path / "out" / task).glob("*.jsonl") for line in p.open()]
    assert records and all({"id", "prompt", "response", "pred", "gold", "correct"} <= set(r) for r in records)


def test_batched_responses_equal_model_chat(make_tiny_model) -> None:
    from qwenkit.tokenizer.tokenization import QWenTokenizer
    from qwenkit.tokenizer.vocab import official_vocab_file

    model = make_tiny_model(vocab_size=151936)
    tok = QWenTokenizer(official_vocab_file())
    prompts = ["short", "a much longer question " * 5, "中文问题？", "x"]
    batched = runner.chat_responses(model, tok, prompts, max_new_tokens=6)
    single = [model.chat(tok, p, history=None, do_sample=False, repetition_penalty=1.0, max_new_tokens=6)[0]
              for p in prompts]  # fmt: skip
    assert batched == single


def canned(monkeypatch: pytest.MonkeyPatch, answers: dict[str, str], calls: list[int]) -> None:
    def fake(model, tokenizer, prompts, max_new_tokens=None, reuse=None):
        calls.append(len(prompts))
        return [answers[p] for p in prompts]

    monkeypatch.setattr(runner, "chat_responses", fake)


def test_resume_and_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenkit.tokenizer.tokenization import QWenTokenizer
    from qwenkit.tokenizer.vocab import official_vocab_file

    root = write_fixtures(tmp_path / "data")
    rows = data.read_csv(root / "mmlu/data/test/abstract_algebra_test.csv", mmlu.COLUMNS)
    answers = {mmlu.format_prompt(rows[0]): "The answer is B", mmlu.format_prompt(rows[1]): "A"}
    calls: list[int] = []
    canned(monkeypatch, answers, calls)
    tok = QWenTokenizer(official_vocab_file())
    kwargs = {
        "data_dir": root / "mmlu/data",
        "subjects": ["abstract_algebra"],
        "out_dir": tmp_path / "out",
        "progress": False,
    }
    result, _ = evaluate(None, tok, "mmlu", limit=1, **kwargs)
    assert result.figures["AVERAGE"] == 100.0 and calls == [1]
    result, _ = evaluate(None, tok, "mmlu", **kwargs)  # the first question is reused
    assert result.figures["AVERAGE"] == 50.0 and calls == [1, 1] and result.generated == 1
    evaluate(None, tok, "mmlu", overwrite=True, **kwargs)
    assert calls == [1, 1, 2]
    with pytest.raises(ValueError, match="other settings"):
        evaluate(None, tok, "mmlu", max_new_tokens=3, **kwargs)


def test_ceval_averages_are_per_subject_means() -> None:
    recs = lambda hits, n: [{"correct": i < hits} for i in range(n)]  # noqa: E731
    figures = ceval.summarize({"computer_network": recs(1, 4), "advanced_mathematics": recs(3, 3),
                               "logic": recs(0, 10)})  # fmt: skip
    assert figures["STEM"] == pytest.approx((25.0 + 100.0) / 2)
    assert figures["Hard"] == 100.0 and figures["Humanities"] == 0.0
    assert figures["AVERAGE"] == pytest.approx((25.0 + 100.0 + 0.0) / 3)


def test_mmlu_averages_are_pooled() -> None:
    recs = lambda hits, n: [{"correct": i < hits} for i in range(n)]  # noqa: E731
    figures = mmlu.summarize({"anatomy": recs(1, 4), "astronomy": recs(3, 3), "philosophy": recs(0, 10)})
    assert figures["stem"] == pytest.approx(100 * 4 / 7)
    assert figures["AVERAGE"] == pytest.approx(100 * 4 / 17)


def test_csv_reads_as_pandas_2_did(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('q,A,B,C,D\n"multi\nline",3,1.50,true,None\ny,4,NA,False,x\n')
    rows = data.read_csv(path)
    assert [r["q"] for r in rows] == ["multi\nline", "y"]
    assert [r["A"] for r in rows] == ["3", "4"]  # int column
    assert [r["B"] for r in rows] == ["1.5", "nan"]  # float column with a missing cell
    assert [r["C"] for r in rows] == ["True", "False"]  # bool column
    assert [r["D"] for r in rows] == ["nan", "x"]  # "None" is one of pandas' NA strings
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(path)
    for col in "qABC":
        assert [str(v) for v in frame[col]] == [r[col] for r in rows]


def test_missing_data_says_where_to_get_it(tmp_path: Path, capsys) -> None:
    assert main(["eval", "-m", str(tmp_path), "--task", "mmlu", "--data", str(tmp_path)]) == 2
    # the model directory is checked first; use the data loader directly for the data message
    with pytest.raises(data.MissingDataError, match=r"(?s)hendrycks.*test/\{subject\}_test.csv"):
        mmlu.TASK.load(__import__("qwenkit.eval.task", fromlist=["LoadOptions"]).LoadOptions(tmp_path))


def test_unknown_subject_is_a_clear_error(tmp_path: Path) -> None:
    from qwenkit.eval.task import LoadOptions

    with pytest.raises(ValueError, match="unknown MMLU subject"):
        mmlu.TASK.load(LoadOptions(tmp_path, subjects=["astrology"]))


def test_question_ids_are_stable() -> None:
    assert Question("a", "s", "p", "B").meta == {}


def test_a_checkpoint_stored_quantized_is_reported_as_such(tiny_dir: Path, tmp_path: Path) -> None:
    int4 = tmp_path / "tiny-int4"
    assert main(["quantize", "-m", str(tiny_dir), "--to", "int4", "-o", str(int4)]) == 0
    root = write_fixtures(tmp_path / "data")
    argv = ["eval", "-m", str(int4), "--task", "mmlu", "--data", str(root / "mmlu/data"), "--out",
            str(tmp_path / "out"), "--max-new-tokens", "2", "--no-progress", "--subjects", "abstract_algebra"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "mmlu" / "summary.json").read_text())
    assert summary["settings"]["weights"] == "int4" and summary["settings"]["quantize"] is None
    # the card row a 1.8B run would be compared with
    assert precision_name("float32", "int4") == "Int4" and precision_name("bfloat16", None) == "BF16"
