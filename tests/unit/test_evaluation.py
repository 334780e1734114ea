"""pass@k by the unbiased estimator, against hand-computed values, and the report's summary."""

from __future__ import annotations

from math import comb

import pytest

from services.common.messages import Variant
from services.rollout.evaluation import EvalReport, ProblemResult, pass_at_k, summarize, to_markdown
from services.rollout.settings import EvalSettings


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (16, 0, 16, 0.0),
        (16, 16, 1, 1.0),
        (16, 1, 16, 1.0),  # n - c < k: any k samples include the success
        (5, 2, 1, 2 / 5),  # pass@1 is the success rate
        (128, 7, 16, 1 - comb(121, 16) / comb(128, 16)),
    ],
)
def test_pass_at_k_matches_hand_computed_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)])
def test_pass_at_k_refuses_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="need 0 <= c <= n"):
        pass_at_k(n, c, k)


def test_summary_averages_over_problems_per_variant() -> None:
    results = [
        ProblemResult(problem_id="a", variant=Variant.UNHINTED, n=4, successes=1, tokens=40, truncated=1),
        ProblemResult(problem_id="b", variant=Variant.UNHINTED, n=4, successes=0, tokens=20, truncated=0),
        ProblemResult(problem_id="a", variant=Variant.HINTED, n=4, successes=4, tokens=8, truncated=0),
    ]
    s = summarize(results, 2)
    assert s["unhinted"]["pass@1"] == pytest.approx((1 / 4 + 0) / 2)
    assert s["unhinted"]["pass@2"] == pytest.approx((0.5 + 0) / 2)
    assert s["unhinted"]["truncated_frac"] == pytest.approx(1 / 8) and s["unhinted"]["response_tokens_mean"] == 7.5
    assert s["hinted"]["pass@1"] == 1.0 and s["hinted"]["problems"] == 1
    report = EvalReport(
        split="eval", k=2, weight_versions=[3], settings=EvalSettings(k=2), summary=s, problems=results, seconds=1.0
    )
    table = to_markdown(report)
    assert "| unhinted | 2 | 0.125 | 0.250 | 7.5 | 12.5% |" in table and "weight version(s) [3]" in table
