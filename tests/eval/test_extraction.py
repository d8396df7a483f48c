"""Answer extraction of every task against the official scripts' behaviour, on tables of tricky answers.

Each expected value is what the official function (evaluate_chat_*.py at QwenLM/Qwen 2df8e8ac) returns for the
same input; the tables were checked against those functions.
"""

from __future__ import annotations

import pytest

from qwenkit.eval import ceval, gsm8k, humaneval, mmlu, tools
from qwenkit.tokenizer.tokenization import QWenTokenizer
from qwenkit.tokenizer.vocab import official_vocab_file

CEVAL_ROW = {
    "question": "关于传输层的面向连接服务的特性是____。",
    "A": "既不保证可靠，也不保证按序交付",
    "B": "不保证可靠，但保证按序交付",
    "C": "保证可靠，但不保证按序交付",
    "D": "既保证可靠，也保证按序交付",
}
CEVAL_CASES = [
    ("答案是D", "D"),
    ("关于传输层的面向连接服务的特性是既保证可靠，也保证按序交付", "D"),  # question and choice text replaced
    ("正确答案：B。", "B"),
    ("答案不是A，应该选C", "C"),  # negation: regex 1 skips 答案不是A, 选C matches
    ("A选项不正确，B选项正确", "B"),
    ("C", "C"),
    ("（B）", "B"),
    ("我认为是 A 和 B", "A"),  # several letters: the first one
    ("这道题选：D", "D"),
    ("保证可靠，但不保证按序交付。", "C"),  # choice text instead of a letter
    ("无法确定", None),  # no letter: thefuzz fallback (computed below)
]


@pytest.mark.parametrize(("response", "expected"), CEVAL_CASES)
def test_ceval_extract(response: str, expected: str | None) -> None:
    got = ceval.extract_answer(response, CEVAL_ROW)
    if expected is None:
        from thefuzz import process

        options = [CEVAL_ROW[c] for c in "ABCD"]
        expected = "ABCD"[options.index(process.extractOne(response, options)[0])]
    assert got == expected


def test_ceval_process_before_extraction_replaces_longest_choice_first() -> None:
    choices = {"A": "保证可靠", "B": "保证可靠，也保证按序交付", "C": "x", "D": "y"}
    assert ceval.process_before_extraction("保证可靠，也保证按序交付", "题目是什么。", choices) == "B"


MMLU_ROW = {"A": "Paris", "B": "London is the capital.", "C": "Berlin", "D": "None of the above"}
MMLU_CASES = [
    ("The answer is B.", "B"),
    ("Answer: C", "C"),
    ("I choose D", "D"),
    ("The answer is not A, it is C", "A"),  # the official cascade reads this as A (regex 1)
    ("A is not correct. B is correct.", "B"),
    ("D", "D"),
    ("paris", "A"),  # choice text (case-insensitive) instead of a letter
    ("london is the capital", "B"),  # trailing "." of the choice dropped before matching
    ("Both A and C seem plausible", "A"),
    ("I am unsure.", None),
]


@pytest.mark.parametrize(("response", "expected"), MMLU_CASES)
def test_mmlu_extract(response: str, expected: str | None) -> None:
    got = mmlu.extract_answer(response, MMLU_ROW)
    if expected is None:
        from thefuzz import process

        options = [MMLU_ROW[c] for c in "ABCD"]
        expected = "ABCD"[options.index(process.extractOne(response, options)[0])]
    assert got == expected


GSM8K_CASES = [
    ("So she has 1,234 apples.", "1234"),
    ("The answer is +5", "5"),
    ("It costs -3.5 dollars", "-3.5"),
    ("First 10, then 20, finally 30.", "30."),  # the official regex keeps a trailing "."
    ("The total is $1,000,000.", "1000000."),
    ("no numbers here", None),
    ("Answer: .5", ".5"),
    ("第一步得到12，所以答案是18。", "18"),  # Chinese punctuation
]


@pytest.mark.parametrize(("text", "expected"), GSM8K_CASES)
def test_gsm8k_extract(text: str, expected: str | None) -> None:
    assert gsm8k.extract_answer(text) == expected


@pytest.mark.parametrize(
    ("response", "gold", "correct"),
    [
        ("The answer is 18.", "18", True),
        ("18.00003", "18", True),  # within abs_tol 1e-4
        ("18.001", "18", False),
        ("It is 1,000", "1000", True),
        ("007", "7", False),  # eval("007") is a SyntaxError in the official script: wrong
        ("nothing", "3", False),
        ("-4", "4", False),
    ],
)
def test_gsm8k_is_correct(response: str, gold: str, correct: bool) -> None:
    assert gsm8k.is_correct(response, gold) is correct


def test_gsm8k_gold_from_reference_solution() -> None:
    assert gsm8k.extract_answer("She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18") == "18"


def test_gsm8k_fewshot_prompt_layout() -> None:
    prompt = gsm8k.format_prompt("How many?", fewshot=True)
    assert prompt.count("Question: ") == 5 and prompt.count("The answer is ") == 4
    assert prompt.endswith("Question: How many?\nLet's think step by step")
    assert gsm8k.format_prompt("How many?") == "How many?"


HE_PROMPT = 'def add(a: int, b: int) -> int:\n    """Add two numbers.\n    >>> add(1, 2)\n    3\n    """\n'


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```", "    return a + b"),
        ("```\ndef add(a, b):\n    return a + b\n```\nDone.", "    return a + b"),
        (
            "Here:\ndef add(a, b):\n    s = a + b\n\n    return s\nprint(add(1, 2))",
            "    s = a + b\n\n    return s",
        ),
        ("def helper(x):\n    return x\n", "    return x"),  # another def: the third regex
        ("return a + b", "    return a + b"),  # no def: indented as a body
    ],
)
def test_humaneval_extract_code(response: str, expected: str) -> None:
    assert humaneval.extract_code(response, "add") == expected


def test_humaneval_prompt() -> None:
    prompt = humaneval.format_prompt(HE_PROMPT, "add")
    assert prompt.startswith(
        "Write a Python function `add(a: int, b: int) -> int` to solve the following problem:\n"
    )
    assert "\nAdd two numbers.\n>>> add(1, 2)\n3\n\n" + HE_PROMPT in prompt


GOLDEN = (
    'Thought: I need weather.\nAction: weather_api\nAction Input: {"city": "北京", "day": 1}\nObservation:'
)


@pytest.mark.parametrize(
    ("gen", "called"),
    [
        ("Thought: ok\nAction: Weather_API \nAction Input: {'city': '北京'}", True),  # case and space
        ("Thought: ok\nAction: search\nAction Input: {}", False),
        ("Action: weather_api\nAction Input: {}", False),  # no "\nAction: " (it starts the text)
        ("Final Answer: sunny", False),
    ],
)
def test_tools_action(gen: str, called: bool) -> None:
    assert tools.is_callable(gen, GOLDEN) is called


def test_tools_action_input_normalised_by_json5() -> None:
    assert tools.process_res("x\nAction: a\nAction Input: {day: 1, 'city': '北京',}\n")["action_input"] == (
        '{"city": "北京", "day": 1}'
    )
    assert tools.process_res("x\nAction: a\nAction Input: not json")["action_input"] == ""


def test_tools_rouge() -> None:
    tok = QWenTokenizer(official_vocab_file())
    same = 'x\nAction: weather_api\nAction Input: {"day": 1, "city": "北京"}'
    assert tools.action_input_rouge(tok, same, GOLDEN) == pytest.approx(1.0)
    part = 'x\nAction: weather_api\nAction Input: {"city": "上海", "day": 1}'
    assert 0 < tools.action_input_rouge(tok, part, GOLDEN) < 1
    assert tools.action_input_rouge(tok, "Final Answer: no", GOLDEN) == 0.0
