"""The retry loop: jittered backoff, and which failures may be sent again (in-memory
transports, no sockets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from services.common import retry
from services.common.engine_client import EngineClient, EngineError, SamplingParams


def test_backoff_is_equal_jitter_doubling_to_the_cap() -> None:
    assert [retry.backoff_delay(k, 0.5, rand=lambda: 0.0) for k in range(7)] == [0.25, 0.5, 1, 2, 4, 5, 5]
    assert [retry.backoff_delay(k, 0.5, rand=lambda: 0.999) for k in range(3)] == pytest.approx([0.5, 1, 2], 1e-3)
    assert retry.backoff_delay(30, 0.5, rand=lambda: 1.0) == retry.MAX_DELAY  # no overflow, capped


def failing(*errors: Exception, then: int = 200) -> tuple[httpx.AsyncClient, list[str]]:
    """A client whose first requests raise ``errors`` in turn, the next answer ``then``; and
    the list of paths it was asked for."""
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if len(seen) <= len(errors):
            raise errors[len(seen) - 1]
        return httpx.Response(then, json={"ok": True})

    return httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://peer"), seen


async def call(http: httpx.AsyncClient, retries: int = 3, **kw: Any) -> httpx.Response:
    return await retry.request(
        http, "POST", "/x", {}, peer="the peer", retries=retries, backoff=0.001, fail=lambda m, s: RuntimeError(m), **kw
    )


async def test_the_pauses_use_the_given_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(retry.asyncio, "sleep", sleep)
    draws = iter([0.0, 0.5, 1.0])
    http, _ = failing(httpx.ConnectError("refused"), httpx.ConnectError("refused"), httpx.ConnectError("refused"))
    assert (await call(http, rand=lambda: next(draws))).status_code == 200
    assert pauses == pytest.approx([0.0005, 0.0015, 0.004])


async def test_a_503_waits_at_least_its_retry_after_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(retry.asyncio, "sleep", sleep)
    answers = iter([("3", 503), ("999", 503), ("soon", 503), (None, 200)])

    def handle(request: httpx.Request) -> httpx.Response:
        after, status = next(answers)
        return httpx.Response(status, json={"detail": "full"}, headers={"Retry-After": after} if after else {})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://peer")
    assert (await call(http, rand=lambda: 0.0)).status_code == 200
    assert pauses == pytest.approx([3.0, retry.MAX_DELAY, 0.002])  # a date form is not read: the backoff


@pytest.mark.parametrize(
    "error", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow handshake"), httpx.PoolTimeout("pool full")]
)
async def test_a_request_that_never_left_is_sent_again_even_when_it_must_not_run_twice(error: Exception) -> None:
    lost: list[bool] = []

    async def on_lost() -> None:
        lost.append(True)

    http, seen = failing(error)
    assert (await call(http, on_lost=on_lost)).status_code == 200
    assert seen == ["/x", "/x"] and not lost


@pytest.mark.parametrize(
    "error",
    [
        httpx.ReadTimeout("slow"),
        httpx.ReadError("reset"),
        httpx.RemoteProtocolError("Server disconnected without sending a response"),
        httpx.WriteError("broken pipe"),
    ],
)
async def test_a_lost_answer_is_not_sent_again_when_the_request_must_not_run_twice(error: Exception) -> None:
    lost: list[bool] = []

    async def on_lost() -> None:
        lost.append(True)

    http, seen = failing(error)
    with pytest.raises(RuntimeError, match="not sent again"):
        await call(http, on_lost=on_lost)
    assert seen == ["/x"] and lost == [True]
    http, seen = failing(error)  # an idempotent request is simply retried
    assert (await call(http)).status_code == 200 and seen == ["/x", "/x"]


def engine_on(handle: Callable[[httpx.Request], httpx.Response]) -> EngineClient:
    client = EngineClient("http://engine", retries=2, backoff=0.001)
    client._http = httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://engine")
    return client


@pytest.mark.parametrize(
    ("prompts", "aborted"),
    [([[1, 2]], [f"g-1-{k}" for k in range(4)]), ([[1, 2], [3]], [f"g-1-{k}" for k in range(8)])],
)
async def test_a_lost_generate_is_aborted_by_the_rids_it_was_sent_with(
    prompts: list[list[int]], aborted: list[str]
) -> None:
    calls: list[tuple[str, Any]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append((request.url.path, body.get("rid")))
        if request.url.path == "/generate":
            raise httpx.ReadTimeout("the engine is still decoding", request=request)
        return httpx.Response(200)

    async with engine_on(handle) as engine:
        with pytest.raises(EngineError, match="not sent again"):
            await engine.generate(prompts, SamplingParams(n=4), rid="g-1")
    sent = [rid for path, rid in calls if path == "/generate"]
    assert sent == [aborted]  # once, a rid for each of the n copies of each prompt
    assert sorted(rid for path, rid in calls if path == "/abort_request") == sorted(aborted)  # each row once


async def test_a_generate_without_a_rid_gets_one_it_can_be_aborted_by() -> None:
    calls: list[tuple[str, Any]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append((request.url.path, json.loads(request.content).get("rid")))
        if request.url.path == "/generate":
            raise httpx.ReadError("connection reset", request=request)
        return httpx.Response(503 if len(calls) == 2 else 200)  # the abort itself is retried

    async with engine_on(handle) as engine:
        with pytest.raises(EngineError):
            await engine.generate([[1]], SamplingParams())
    [(_, rids), (_, first_abort), (_, second_abort)] = calls
    assert isinstance(rids, list) and len(rids) == 1 and rids[0] and first_abort == second_abort == rids[0]
