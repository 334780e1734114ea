"""Answer extraction and scoring (pure; in-process math-verify on inputs that cannot hang)."""

from __future__ import annotations

import pytest
from math_verify import parse, verify

from services.verifier.scoring import last_boxed, parse_gold, score_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("first \\boxed{1}, finally \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("nested \\boxed{\\{1, \\{2\\}\\}} and \\boxed{x^{2^{3}}}", "x^{2^{3}}"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 5$", "5"),
        ("cut off \\boxed{\\frac{1}{", None),
        ("no box at all: 42", None),
        ("\\boxed{}", ""),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


# (completion, gold, correct?) in the forms models and datasets write answers.
CASES = [
    ("\\boxed{42}", "42", True),
    ("\\boxed{41}", "42", False),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{1/2}", "\\frac12", True),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", True),
    ("\\boxed{\\{1,2,3\\}}", "\\{3,2,1\\}", True),
    ("\\boxed{\\{1,2\\}}", "\\{1,2,3\\}", False),
    ("\\boxed{[0,1)}", "[0,1)", True),
    ("\\boxed{(0,1)}", "[0,1)", False),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{x^2+1}", "x^2+2x+1", False),
    ("\\boxed{5\\text{ cm}}", "5", True),
    ("\\boxed{\\sqrt{2}}", "2^{1/2}", True),
    ("\\boxed{2\\pi}", "2\\pi", True),
    ("The final answer is $7$.", "7", True),
    ("I have no idea.", "7", False),
]


@pytest.mark.parametrize(("completion", "gold", "correct"), CASES)
def test_verdicts(completion: str, gold: str, correct: bool) -> None:
    score = score_answer(parse_gold(gold), completion)
    assert score.reward == (1.0 if correct else 0.0), score
    assert not score.timed_out and score.error is None


@pytest.mark.parametrize(("completion", "gold", "correct"), CASES)
def test_same_verdict_as_raw_math_verify(completion: str, gold: str, correct: bool) -> None:
    raw = verify(parse(f"${gold}$"), parse(completion))
    assert raw == (score_answer(parse_gold(gold), completion).reward == 1.0)


def test_no_answer_reports_nothing_extracted() -> None:
    score = score_answer(parse_gold("7"), "I have no idea.")
    assert score.reward == 0.0 and score.extracted is None
    assert score_answer(parse_gold("7"), "so \\boxed{7}").extracted == "7"
