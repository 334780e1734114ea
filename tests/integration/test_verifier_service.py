"""`pope verifier` as real processes: POST /v1/verify over HTTP, and the stream path with
verifiers sharing work and one of them killed with SIGKILL while holding groups."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
from redis import Redis

from services.common.keys import VERIFIERS, Keys
from services.common.messages import FinishReason, RawGroup, Sample, ScoredGroup, ScoringPolicy, decode, encode
from services.common.streams import DATA
from tests.conftest import running_pope

TOWER = "\\boxed{9^{9^{9^{9^{9}}}}}"  # refused by the guard at once
SLOW = "\\boxed{\\sum_{k=0}^{100} \\binom{100}{k} x^{k} y^{100-k}}"  # past the guard, ~10 s in math-verify


def env_for(redis_url: str, keys: Keys, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "POPE_VERIFIER__KEY_PREFIX": keys.prefix, **extra}


def test_verify_over_http(redis_url: str, keys: Keys) -> None:
    env = env_for(redis_url, keys, POPE_VERIFIER__TIMEOUT_S="2", POPE_VERIFIER__API_TOKEN="t0k")
    with running_pope(["verifier", "--workers", "2"], "/readyz", env) as proc:
        rows = [
            {"answer": "so \\boxed{\\frac{1}{2}}", "gold": "0.5"},
            {"answer": TOWER, "gold": "3"},
            {"answer": "The answer is $7$.", "gold": "7"},
            {"answer": "\\boxed{8}", "gold": "7"},
            {"answer": "no answer", "gold": "7"},
            {"answer": SLOW, "gold": "3"},
        ]
        auth = {"Authorization": "Bearer t0k"}
        assert httpx.post(f"{proc.url}/v1/verify", json=rows, timeout=30).status_code == 401
        resp = httpx.post(f"{proc.url}/v1/verify", json=rows, headers=auth, timeout=30)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert [r["reward"] for r in out] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
        assert [r["timed_out"] for r in out] == [False, False, False, False, False, True]
        assert [r["extracted"] for r in out] == ["\\frac{1}{2}", "9^{9^{9^{9^{9}}}}", "7", "8", None, SLOW[7:-1]]
        assert "exponents" in out[1]["error"] and "longer than 2s" in out[5]["error"]
        bad = httpx.post(f"{proc.url}/v1/verify", json=[{"answer": "x", "gold": "1"}, {"answer": 3}], headers=auth)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][:2] == ["body", 1]
        metrics = httpx.get(f"{proc.url}/metrics").text
        assert 'pope_verifier_timed_out_total{path="http"} 1.0' in metrics
        assert 'pope_verifier_worker_restarts_total{reason="timeout"} 1.0' in metrics


def raw_group(i: int, slow: bool) -> RawGroup:
    texts = ["\\boxed{4}", SLOW if slow else "\\boxed{5}", "\\boxed{2+2}"]
    samples = [
        Sample(
            problem_id=f"p{i}",
            variant="unhinted",
            prompt_ids=[1],
            completion_ids=[2],
            logprobs=[-0.1],
            finish_reason="stop",
            weight_version=0,
            text=t,
        )
        for t in texts
    ]
    return RawGroup(
        group_id=f"g{i}",
        problem_id=f"p{i}",
        variant="unhinted",
        prompt="2+2?",
        answer="4",
        samples=samples,
        weight_version=0,
        step=0,
        temperature=1.0,
    )


def scored(r: Redis, keys: Keys) -> list[ScoredGroup]:
    return [decode(ScoredGroup, f[DATA]) for _i, f in r.xrange(keys.scored)]


def wait_scored(r: Redis, keys: Keys, n: int, within_s: float = 60) -> None:
    """Block on the scored stream (XREAD) until it holds ``n`` entries."""
    deadline, last = time.monotonic() + within_s, "0"
    while r.xlen(keys.scored) < n:
        assert time.monotonic() < deadline, f"only {r.xlen(keys.scored)} of {n} groups scored"
        reply: Any = r.xread({keys.scored: last}, block=500)
        if reply:
            last = reply[0][1][-1][0]


def test_killed_verifier_loses_no_group_and_none_is_scored_twice(redis_url: str, keys: Keys) -> None:
    r = Redis.from_url(redis_url)
    n = 8
    env = env_for(
        redis_url,
        keys,
        POPE_VERIFIER__TIMEOUT_S="1.5",
        POPE_VERIFIER__STREAMS__LEASE_MS="1000",
        POPE_VERIFIER__STREAMS__BLOCK_MS="200",
    )
    with (
        running_pope(["verifier", "--workers", "1"], "/readyz", env) as a,
        running_pope(["verifier", "--workers", "1"], "/readyz", env) as b,
    ):
        for i in range(n):
            r.xadd(keys.rollouts, {DATA: encode(raw_group(i, slow=True))})
        wait_scored(r, keys, 1)
        holders = {c["name"].decode(): c["pending"] for c in r.xinfo_consumers(keys.rollouts, VERIFIERS)}
        victim = a if any(str(a.pid) in name and held for name, held in holders.items()) else b
        survivor = b if victim is a else a
        assert any(str(victim.pid) in name and held for name, held in holders.items()), holders
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        wait_scored(r, keys, n, within_s=90)
        assert survivor.poll() is None
        groups = scored(r, keys)
        ids = [g.group_id for g in groups]
        assert sorted(ids) == sorted(f"g{i}" for i in range(n)) and len(ids) == n, ids
        assert all([s.reward for s in g.scores] == [1.0, 0.0, 1.0] for g in groups)
        assert all(g.scores[1].timed_out for g in groups)
        assert r.xpending(keys.rollouts, VERIFIERS)["pending"] == 0
    r.close()


def test_truncated_samples_score_zero(redis_url: str, keys: Keys) -> None:
    r = Redis.from_url(redis_url)
    group = raw_group(0, slow=False)
    cut = group.samples[0].model_copy(update={"finish_reason": FinishReason.LENGTH})
    group = group.model_copy(update={"samples": [cut, *group.samples[1:]]})
    with running_pope(["verifier", "--workers", "1"], "/readyz", env_for(redis_url, keys)):
        r.xadd(keys.rollouts, {DATA: encode(group)})
        wait_scored(r, keys, 1)
    [g] = scored(r, keys)
    assert [s.reward for s in g.scores] == [0.0, 0.0, 1.0] and g.scores[0].extracted == "4"
    assert g.policy is ScoringPolicy.JOINED_BOXES_V2  # the rules that scored it travel with it
    r.close()
