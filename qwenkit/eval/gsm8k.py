"""GSM8K (test split): exactly `eval/evaluate_chat_gsm8k.py` of QwenLM/Qwen.

Zero-shot: the question alone is the chat query; with `fewshot`, the official four worked examples come first
("Question: ...\nLet's think step by step\n..."). The answer is the last number of the response (official regex,
commas and "+" removed), compared with the last number of the reference by `isclose(abs_tol=1e-4)`.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping, Sequence

from .data import find_data, load_hub, read_jsonl, require_fields
from .task import LoadOptions, Question, Record, Task, percent, take

LAST_NUMBER = re.compile(r"([+-])?(?=([0-9]|\.[0-9]))(0|([1-9](\d{0,2}(,\d{3})*)|\d*))?(\.\d*)?(?=\D|$)")
HOW_TO_GET = (
    "Get it with: python -c \"import datasets; datasets.load_dataset('gsm8k', 'main', split='test')"
    ".to_json('data/gsm8k/test.jsonl')\" (or test.jsonl of github.com/openai/grade-school-math).\n"
    'Expected layout: DIR/test.jsonl (or DIR/gsm8k/test.jsonl), one {"question", "answer"} per line.'
)
# The official 4-shot prompt (`doc_to_text(doc, use_fewshot=True)`), one worked example per entry.
# fmt: off
FEWSHOT_EXAMPLES = (
    "Question: Angelo and Melanie want to plan how many hours over the next week they should study together for their test next week. They have 2 chapters of their textbook to study and 4 worksheets to memorize. They figure out that they should dedicate 3 hours to each chapter of their textbook and 1.5 hours for each worksheet. If they plan to study no more than 4 hours each day, how many days should they plan to study total over the next week if they take a 10-minute break every hour, include 3 10-minute snack breaks each day, and 30 minutes for lunch each day?\nLet's think step by step\nAngelo and Melanie think they should dedicate 3 hours to each of the 2 chapters, 3 hours x 2 chapters = 6 hours total.\nFor the worksheets they plan to dedicate 1.5 hours for each worksheet, 1.5 hours x 4 worksheets = 6 hours total.\nAngelo and Melanie need to start with planning 12 hours to study, at 4 hours a day, 12 / 4 = 3 days.\nHowever, they need to include time for breaks and lunch. Every hour they want to include a 10-minute break, so 12 total hours x 10 minutes = 120 extra minutes for breaks.\nThey also want to include 3 10-minute snack breaks, 3 x 10 minutes = 30 minutes.\nAnd they want to include 30 minutes for lunch each day, so 120 minutes for breaks + 30 minutes for snack breaks + 30 minutes for lunch = 180 minutes, or 180 / 60 minutes per hour = 3 extra hours.\nSo Angelo and Melanie want to plan 12 hours to study + 3 hours of breaks = 15 hours total.\nThey want to study no more than 4 hours each day, 15 hours / 4 hours each day = 3.75\nThey will need to plan to study 4 days to allow for all the time they need.\nThe answer is 4\n\n",
    "Question: Mark's basketball team scores 25 2 pointers, 8 3 pointers and 10 free throws.  Their opponents score double the 2 pointers but half the 3 pointers and free throws.  What's the total number of points scored by both teams added together?\nLet's think step by step\nMark's team scores 25 2 pointers, meaning they scored 25*2= 50 points in 2 pointers.\nHis team also scores 6 3 pointers, meaning they scored 8*3= 24 points in 3 pointers\nThey scored 10 free throws, and free throws count as one point so they scored 10*1=10 points in free throws.\nAll together his team scored 50+24+10= 84 points\nMark's opponents scored double his team's number of 2 pointers, meaning they scored 50*2=100 points in 2 pointers.\nHis opponents scored half his team's number of 3 pointers, meaning they scored 24/2= 12 points in 3 pointers.\nThey also scored half Mark's team's points in free throws, meaning they scored 10/2=5 points in free throws.\nAll together Mark's opponents scored 100+12+5=117 points\nThe total score for the game is both team's scores added together, so it is 84+117=201 points\nThe answer is 201\n\n",
    "Question: Bella has two times as many marbles as frisbees. She also has 20 more frisbees than deck cards. If she buys 2/5 times more of each item, what would be the total number of the items she will have if she currently has 60 marbles?\nLet's think step by step\nWhen Bella buys 2/5 times more marbles, she'll have increased the number of marbles by 2/5*60 = 24\nThe total number of marbles she'll have is 60+24 = 84\nIf Bella currently has 60 marbles, and she has two times as many marbles as frisbees, she has 60/2 = 30 frisbees.\nIf Bella buys 2/5 times more frisbees, she'll have 2/5*30 = 12 more frisbees.\nThe total number of frisbees she'll have will increase to 30+12 = 42\nBella also has 20 more frisbees than deck cards, meaning she has 30-20 = 10 deck cards\nIf she buys 2/5 times more deck cards, she'll have 2/5*10 = 4 more deck cards.\nThe total number of deck cards she'll have is 10+4 = 14\nTogether, Bella will have a total of 14+42+84 = 140 items\nThe answer is 140\n\n",
    "Question: A group of 4 fruit baskets contains 9 apples, 15 oranges, and 14 bananas in the first three baskets and 2 less of each fruit in the fourth basket. How many fruits are there?\nLet's think step by step\nFor the first three baskets, the number of apples and oranges in one basket is 9+15=24\nIn total, together with bananas, the number of fruits in one basket is 24+14=38 for the first three baskets.\nSince there are three baskets each having 38 fruits, there are 3*38=114 fruits in the first three baskets.\nThe number of apples in the fourth basket is 9-2=7\nThere are also 15-2=13 oranges in the fourth basket\nThe combined number of oranges and apples in the fourth basket is 13+7=20\nThe fourth basket also contains 14-2=12 bananas.\nIn total, the fourth basket has 20+12=32 fruits.\nThe four baskets together have 32+114=146 fruits.\nThe answer is 146\n\n",
)
# fmt: on


def format_prompt(question: str, fewshot: bool = False) -> str:
    """The official `doc_to_text`: the question, or the 4-shot context ending in "Let's think step by step"."""
    if not fewshot:
        return question
    return "".join(FEWSHOT_EXAMPLES) + f"Question: {question}\nLet's think step by step"


def extract_answer(text: str) -> str | None:
    """The last number in `text` as the official script reads it ("1,234" -> "1234", "+5" -> "5"), else None."""
    matches = list(LAST_NUMBER.finditer(text))
    if not matches:
        return None
    return matches[-1].group().replace(",", "").replace("+", "").strip()


def _value(number: str) -> int | float:
    # The official script calls eval() on these regex-made strings; literal_eval gives the same value (or the
    # same SyntaxError, e.g. for "007") without evaluating arbitrary text.
    value = ast.literal_eval(number)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(number)
    return value


def is_correct(response: str, gold: str) -> bool:
    """The official `is_correct`: isclose(gold, pred, rel_tol=0, abs_tol=1e-4); unreadable numbers are wrong."""
    pred = extract_answer(response)
    if pred is None:
        return False
    try:
        return math.isclose(_value(gold), _value(pred), rel_tol=0, abs_tol=1e-4)
    except (SyntaxError, ValueError, TypeError, OverflowError):
        return False


def _load(options: LoadOptions) -> dict[str, list[Question]]:
    if options.subjects and list(options.subjects) != ["main"]:
        raise ValueError("GSM8K has no subjects (its one subject is 'main'); drop --subjects")
    if options.data_dir is None:
        rows = load_hub("gsm8k", "main", "test", HOW_TO_GET)
        source = "gsm8k (hub)"
    else:
        path = find_data(
            options.data_dir, ["test.jsonl", "gsm8k/test.jsonl", ""], "GSM8K test.jsonl", HOW_TO_GET
        )
        if path.is_dir():
            raise FileNotFoundError(f"no test.jsonl in {path}. {HOW_TO_GET}")
        rows, source = list(read_jsonl(path)), str(path)
    questions = []
    for i, row in enumerate(rows):
        require_fields(row, ("question", "answer"), source)
        gold = extract_answer(row["answer"])
        if gold is None:
            raise ValueError(f"{source}, record {i}: no number in its answer (the reference solution)")
        questions.append(
            Question(
                str(i),
                "main",
                format_prompt(row["question"], options.fewshot),
                gold,
                {"answer": row["answer"]},
            )
        )
    return {"main": take(questions, options.limit)}


def _score(question: Question, response: str) -> Record:
    return {"pred": extract_answer(response), "correct": is_correct(response, question.gold)}


def summarize(records: Mapping[str, Sequence[Record]]) -> dict[str, float]:
    """Accuracy over all questions (the official `np.mean(acc_res)`), in percent."""
    recs = [r for rs in records.values() for r in rs]
    return {"accuracy": percent(sum(r["correct"] for r in recs), len(recs))}


def make_task(fewshot: bool = False) -> Task:
    title = "GSM8K (test, 4-shot)" if fewshot else "GSM8K (test, zero-shot)"
    return Task("gsm8k", title, _load, _score, summarize, headline="accuracy", options={"fewshot": fewshot})


TASK = make_task()
