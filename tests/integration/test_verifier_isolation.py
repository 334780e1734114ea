"""POST /v1/verify against a real ``pope verifier`` and a real Redis: ad-hoc scoring of
hard answers does not hold up training's stream scoring, and every request is bounded
(rows, answer and gold lengths, body size, its deadline, how many are taken at once)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable

import httpx
from redis import Redis

from services.common.keys import Keys
from services.common.messages import encode
from services.common.streams import DATA
from services.common.verifier_client import MAX_ROWS, NOT_SCORED, VerifierClient
from services.verifier.verify_api import MAX_ANSWER_CHARS, MAX_GOLD_CHARS
from tests.conftest import running_pope
from tests.integration.test_verifier_service import SLOW, env_for, raw_group, wait_scored

AUTH = {"Authorization": "Bearer t0k"}


def answers_scored(url: str) -> float:
    """Answers the verifier has scored so far, both pools (its answer-time histogram's count)."""
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(r"^pope_verifier_answer_seconds_count (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def in_background(fn: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    out: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def wait_for(condition: Callable[[], bool], what: str, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {within_s}s"
        time.sleep(0.02)


def hard_request(url: str, hard: int, timeout: float = 120) -> Callable[[], httpx.Response]:
    """A request whose first answer is quick and the ``hard`` after it each take the full
    per-answer limit, all against one gold (so one worker scores them in turn)."""
    rows = [{"answer": "\\boxed{4}", "gold": "4"}] + [{"answer": SLOW, "gold": "4"}] * hard
    return lambda: httpx.post(f"{url}/v1/verify", json=rows, headers=AUTH, timeout=timeout)


def test_hard_verify_request_does_not_starve_training(redis_url: str, keys: Keys) -> None:
    r = Redis.from_url(redis_url)
    timeout_s, hard = 2.0, 5  # the request holds its worker for about 10 s
    env = env_for(
        redis_url,
        keys,
        POPE_VERIFIER__TIMEOUT_S=str(timeout_s),
        POPE_VERIFIER__VERIFY_DEADLINE_S="60",  # the whole request in one go
        POPE_VERIFIER__API_TOKEN="t0k",
        POPE_VERIFIER__STREAMS__BLOCK_MS="100",
    )
    # One worker for each: before verify_workers, this request would have held the only one.
    with running_pope(["verifier", "--workers", "1", "--verify-workers", "1"], "/readyz", env) as proc:
        scored = 0

        def training_latency(i: int) -> float:
            nonlocal scored
            start = time.monotonic()
            r.xadd(keys.rollouts, {DATA: encode(raw_group(i, slow=False))})
            scored += 1
            wait_scored(r, keys, scored)
            return time.monotonic() - start

        training_latency(0)  # the first group also pays for the stream reader's start
        baseline = [training_latency(1 + i) for i in range(3)]
        before = answers_scored(proc.url)
        request, reply = in_background(hard_request(proc.url, hard))
        started = time.monotonic()
        # Its quick first answer is scored: its worker is now on the first hard one.
        wait_for(lambda: answers_scored(proc.url) > before, "the verify request's first answer")
        loaded = [training_latency(10 + i) for i in range(3)]
        during = time.monotonic() - started
        normal = max(baseline)
        bound = normal + 1.5
        assert max(loaded) < bound, (
            f"training groups took {[f'{x:.2f}' for x in loaded]}s while a verify request of {hard} answers at "
            f"the {timeout_s:g}s limit ran, {[f'{x:.2f}' for x in baseline]}s without it: over the {bound:.2f}s bound"
        )
        assert request.is_alive(), f"the verify request was over within {during:.1f}s: nothing overlapped"
        request.join(120)
        [resp] = reply
        elapsed = time.monotonic() - started
        assert resp.status_code == 200, resp.text
        assert [s["timed_out"] for s in resp.json()] == [False] + [True] * hard
        assert elapsed >= hard * timeout_s * 0.9, f"the request took {elapsed:.1f}s: its answers were not hard"
        print(
            f"training latency {[round(x, 3) for x in baseline]}s alone, {[round(x, 3) for x in loaded]}s "
            f"beside a {elapsed:.1f}s verify request"
        )
    r.close()


def test_verify_bounds(redis_url: str, keys: Keys) -> None:
    deadline_s, timeout_s = 5.0, 2.0  # room for 512 quick rows on a busy machine
    env = env_for(
        redis_url,
        keys,
        POPE_VERIFIER__TIMEOUT_S=str(timeout_s),
        POPE_VERIFIER__VERIFY_DEADLINE_S=str(deadline_s),
        POPE_VERIFIER__VERIFY_QUEUE="1",
        POPE_VERIFIER__MAX_BODY_BYTES=str(4 << 20),
        POPE_VERIFIER__API_TOKEN="t0k",
    )
    with running_pope(["verifier", "--workers", "1", "--consume", "no"], "/readyz", env) as proc:
        url = f"{proc.url}/v1/verify"

        def post(body: object) -> httpx.Response:
            return httpx.post(url, json=body, headers=AUTH, timeout=30)

        def refused(resp: httpx.Response, status: int, says: str) -> None:
            assert resp.status_code == status and says in resp.text, (resp.status_code, resp.text[:300])

        row = {"answer": "\\boxed{1}", "gold": "1"}
        assert post([row] * MAX_ROWS).status_code == 200
        refused(post([row] * (MAX_ROWS + 1)), 422, f"at most {MAX_ROWS} items")
        refused(post([row, {"answer": "x" * (MAX_ANSWER_CHARS + 1), "gold": "1"}]), 422, f"at most {MAX_ANSWER_CHARS}")
        refused(post([{"answer": "1", "gold": "1" * (MAX_GOLD_CHARS + 1)}]), 422, f"at most {MAX_GOLD_CHARS}")
        refused(post([{"answer": "x" * MAX_ANSWER_CHARS, "gold": "1"}] * 5), 413, "max_body_bytes")
        for body in (b'[{"answer": NaN, "gold": "1"}]', b"NaN", b'[{"answer": "1", "gold": Infinity}]'):
            resp = httpx.post(url, content=body, headers={**AUTH, "Content-Type": "application/json"})
            refused(resp, 422, "detail")

        # The deadline: the first hard answers are cut at their own limit, the one in hand
        # at the request's deadline there, the rest are never started.
        start = time.monotonic()
        slow = post([{"answer": SLOW, "gold": "4"}] * 4)
        elapsed = time.monotonic() - start
        assert slow.status_code == 200 and elapsed < deadline_s + timeout_s, (slow.status_code, elapsed)
        errors = [s["error"] for s in slow.json()]
        assert all(s["timed_out"] and s["reward"] == 0.0 for s in slow.json())
        assert "longer than 2s" in errors[0] and errors[-1] == NOT_SCORED, errors

        # The client sends the rows the deadline left again, until every row is scored.
        async def through_client() -> list[float]:
            async with VerifierClient(proc.url, api_token="t0k") as client:
                scores = await client.verify([(SLOW, "4")] * 4 + [("\\boxed{4}", "4")])
            assert not any(s.error == NOT_SCORED for s in scores), scores
            return [s.reward for s in scores]

        assert asyncio.run(through_client()) == [0.0] * 4 + [1.0]

        # verify_queue: with one request in hand, the next is a 503 with Retry-After.
        before = answers_scored(proc.url)
        request, reply = in_background(hard_request(proc.url, 2))
        wait_for(lambda: answers_scored(proc.url) > before, "the first request's quick answer")
        busy = post([row])
        refused(busy, 503, "verify_queue")
        assert 1 <= int(busy.headers["Retry-After"]) <= deadline_s, busy.headers
        request.join(30)
        assert reply[0].status_code == 200 and post([row]).status_code == 200
