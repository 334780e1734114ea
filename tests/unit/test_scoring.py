"""Answer extraction and scoring (pure; in-process math-verify on inputs that cannot hang)."""

from __future__ import annotations

import pytest
from math_verify import parse, verify

from services.common.messages import ScoringPolicy
from services.verifier.scoring import final_answer, last_boxed, normalize_numbers, parse_gold, score_answer


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$x=\\boxed{1}$ and $x=\\boxed{2}$", ["1", "2"]),
        ("\\boxed{1}, \\boxed{2},\\quad \\boxed{3}", ["1", "2", "3"]),
        ("\\boxed{1} \\text{ or } \\boxed{-1}", ["1", "-1"]),
        ("$a=\\boxed{2}$; $b_{1} = \\boxed{7}$", ["2", "7"]),
        ("I get \\boxed{3}. Wait, that is wrong: \\boxed{5}", ["5"]),
        ("\\boxed{3} is abandoned, then \\boxed{4} and \\boxed{5}", ["4", "5"]),
        ("(a) first \\boxed{1}.\n(b) then \\boxed{2}.", ["1", "2"]),
        ("**(a)** \\boxed{9}, no: \\boxed{1}.\n\n**(b)** \\boxed{2}", ["1", "2"]),
        ("(a) is asked, see below \\boxed{1}. Later \\boxed{2}", ["2"]),  # one label: no parts
        ("\\boxed{1} and \\boxed{\\frac{1}{2", None),  # the last box is cut off: no answer
        ("no box here", []),
        ("\\boxed{1}" + " " * 200 + "\\boxed{2}", ["2"]),  # a long gap never joins
    ],
)
def test_final_answer_joins_boxes_only_across_joiners(text: str, expected: list[str] | None) -> None:
    assert final_answer(text) == expected


def test_joiner_matching_is_bounded_on_hostile_gaps() -> None:
    """A gap that almost matches must not backtrack for long (each is at most 120 chars)."""
    import time

    text = "".join(f"\\boxed{{{i}}}" + " x =" * 29 + " !" for i in range(2000)) + "\\boxed{0}"
    start = time.monotonic()
    assert final_answer(text) == ["0"]
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2{,}5", "2.5"),
        ("-0{,}75", "-0.75"),
        ("1{,}234", "1234"),
        ("1{,}234{,}567.5", "1234567.5"),
        ("12{,}3456", "12.3456"),
        ("1\\,000\\,000", "1000000"),
        ("1\\,23", "1\\,23"),  # not a group of three: left alone
        ("2,5", "2,5"),  # a bare comma stays a list
        ("\\{1{,}2\\}", "\\{1.2\\}"),
    ],
)
def test_normalize_numbers(text: str, expected: str) -> None:
    assert normalize_numbers(text) == expected


@pytest.mark.parametrize(
    ("gold", "completion", "correct"),
    [
        ("$\\frac{1}{2}$", "\\boxed{0.5}", True),
        ("\\(\\frac{1}{2}\\)", "\\boxed{0.5}", True),
        ("\\[x^2-1\\]", "\\boxed{(x-1)(x+1)}", True),
        ("\\boxed{7}", "\\boxed{7}", True),
        ("The answer is $15$.", "\\boxed{15}", True),
        ("The answer is $15$.", "\\boxed{16}", False),
        ("\\$18.90", "\\boxed{18.90}", True),  # an escaped dollar is not a delimiter
        ("(a) 3, (b) 5", "(a) \\boxed{3}\n(b) \\boxed{5}", True),
        ("1, 2", "\\boxed{1}", False),
    ],
)
def test_gold_readings(gold: str, completion: str, correct: bool) -> None:
    assert score_answer(parse_gold(gold), completion).reward == (1.0 if correct else 0.0)


def test_last_box_v1_is_the_old_reading() -> None:
    v1 = ScoringPolicy.LAST_BOX_V1
    two = "So $x=\\boxed{1}$ and $x=\\boxed{2}$."
    assert score_answer(parse_gold("1, 2", v1), two, v1).reward == 0.0
    assert score_answer(parse_gold("1, 2"), two).reward == 1.0
    assert score_answer(parse_gold("2", v1), two, v1).reward == 1.0


def test_a_repeated_box_is_one_answer() -> None:
    assert final_answer("\\boxed{1} \\boxed{1} and \\boxed{1}") == ["1"]
    assert score_answer(parse_gold("1"), " ".join(["\\boxed{1}"] * 3000)).reward == 1.0


def test_the_workers_scorer_remembers_and_agrees_with_score_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scorer (what a scoring worker uses) gives score_answer's verdict on every case, twice
    over, parsing each gold and judging each (gold, final answer) once; it forgets the least
    recently used past its size, and keeps no failure."""
    from services.verifier import scoring

    parses = {"gold": 0, "boxes": 0}
    real_gold, real_boxes = scoring.parse_gold, scoring._parse_boxes

    def counted_gold(*a: object) -> object:
        parses["gold"] += 1
        return real_gold(*a)  # type: ignore[arg-type]

    def counted_boxes(*a: object) -> object:
        parses["boxes"] += 1
        return real_boxes(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(scoring, "parse_gold", counted_gold)
    monkeypatch.setattr(scoring, "_parse_boxes", counted_boxes)
    scorer = scoring.Scorer(size=64)
    for _ in range(2):
        for completion, gold, _correct in CASES:
            got = scorer.score(gold, scorer.gold(gold), completion)
            assert got == score_answer(real_gold(gold), completion), (completion, gold)
    boxed = sum("boxed" in c for c, _, _ in CASES)
    golds = len({g for _, g, _ in CASES})
    # The direct score_answer calls above parse boxes too: once per boxed case per round.
    assert parses == {"gold": golds, "boxes": boxed + 2 * boxed}

    small = scoring.Scorer(size=2)
    for gold in ("1", "2", "3", "1"):
        small.gold(gold)
    assert list(small._golds) == ["3", "1"]
    monkeypatch.setattr(scoring, "judge_boxes", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    for _ in range(2):
        with pytest.raises(RuntimeError):
            small.score("1", small.gold("1"), "\\boxed{9}")
    assert ("1", ("9",)) not in small._judged
