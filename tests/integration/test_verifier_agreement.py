"""The verifier's verdicts against the expected ones, next to raw math-verify's, on the
agreement corpus (tests/data/verifier/agreement.jsonl): through a real `pope verifier`'s
POST /v1/verify, the same scoring the stream path uses. The table it checks is
`python -m services.verifier.agreement` (docs/verifier.md)."""

from __future__ import annotations

import httpx

from services.common.messages import ScoringPolicy
from services.verifier import agreement
from tests.conftest import running_pope

KNOWN_MISSES = {
    # An inequality chain for an interval: neither math-verify nor the policy reads it.
    ("interval", "[-2, 5]", "The domain is $\\boxed{-2 \\le x \\le 5}$."),
}


def test_the_verifier_agrees_at_least_as_often_as_raw_math_verify_on_every_kind() -> None:
    cases = agreement.load()
    assert len(cases) >= 150 and {c.kind for c in cases} == set(agreement.KINDS)
    with running_pope(["verifier", "--workers", "2"], "/readyz", {"POPE_VERIFIER__CONSUME": "false"}) as proc:
        ours, policy = agreement.service_verdicts(cases, proc.url)
    assert policy == ScoringPolicy.JOINED_BOXES_V2
    columns = {
        "raw": agreement.raw_verdicts(cases),
        "raw_gold_in_dollars": agreement.raw_verdicts(cases, wrap_gold=True),
        "ours": ours,
    }
    rows = agreement.table(cases, columns)
    print("\n" + agreement.markdown(rows))
    for kind, row in rows.items():
        assert row["ours"] >= row["raw"] and row["ours"] >= row["raw_gold_in_dollars"], (kind, row)
    misses = {(c.kind, c.gold, c.completion) for c, v in zip(cases, ours, strict=True) if v != c.expected}
    assert misses == KNOWN_MISSES


def test_the_old_policy_still_scores_as_it_did() -> None:
    """`last-box-v1` on request: the run's header says so, and abandoned-box handling and
    gold reading are the old ones (several boxes read as the last alone)."""
    env = {"POPE_VERIFIER__CONSUME": "false", "POPE_VERIFIER__POLICY": "last-box-v1"}
    rows = [
        {"answer": "So $x=\\boxed{1}$ and $x=\\boxed{2}$.", "gold": "1, 2"},
        {"answer": "I get $\\boxed{3}$. Wait, no: $\\boxed{5}$.", "gold": "5"},
        {"answer": "I get $\\boxed{3}$. Wait, no: $\\boxed{5}$.", "gold": "3"},
    ]
    with running_pope(["verifier", "--workers", "1"], "/readyz", env) as proc:
        resp = httpx.post(f"{proc.url}/v1/verify", json=rows, timeout=60)
    assert resp.headers["X-Pope-Scoring-Policy"] == "last-box-v1"
    assert [r["reward"] for r in resp.json()] == [0.0, 1.0, 0.0]
