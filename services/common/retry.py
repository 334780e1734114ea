"""The one retry loop, and the shared base, of the project's HTTP clients (engine_client,
verifier_client).

A failure to connect (refused, connect or pool timeout: the request never left) and 503 (a
server starting, loading or full) are retried with jittered exponential backoff up to
``retries`` times, waiting at least a 503's ``Retry-After`` (to ``MAX_DELAY``); any other
refusal raises at once. The other transport errors (a read timeout, a connection dropped
after the request went out) leave it unknown whether the server is still working on the
request: an idempotent request is retried like the rest, one that must not run twice
(``on_lost``) is not sent again. Each client raises its own error type, so callers catch
one exception per peer.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

import httpx

log = logging.getLogger(__name__)

MAX_DELAY = 10.0
"""Seconds: the backoff stops doubling here."""

UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
"""Transport errors raised before any byte of the request left: the server never saw it."""


def error_message(resp: httpx.Response) -> str:
    """The server's own message from an error response, short."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or data.get("detail") or data)[:500]
    return str(data)[:500]


def backoff_delay(attempt: int, backoff: float, rand: Callable[[], float] = random.random) -> float:
    """The pause after failed attempt ``attempt`` (0-based): "equal jitter", uniform in
    [d/2, d) for d = min(backoff * 2**attempt, MAX_DELAY). The jitter spreads clients that
    failed together (every rollout worker when the engine restarts) so they do not come
    back in lockstep; keeping the lower half, unlike full jitter's [0, d), keeps at least
    half of the patience that ``retries`` was sized for."""
    d = min(backoff * 2.0**attempt, MAX_DELAY)
    return d / 2 + rand() * d / 2


def retry_after(resp: httpx.Response) -> float:
    """A 503's ``Retry-After`` in seconds (the delta form), capped at ``MAX_DELAY``; 0 without one."""
    value = resp.headers.get("retry-after", "")
    return min(float(value), MAX_DELAY) if value.isdigit() else 0.0


def _ok(resp: httpx.Response) -> bool:
    return resp.status_code < 400


async def request(
    http: httpx.AsyncClient,
    method: str,
    path: str,
    json: Any = None,
    *,
    peer: str,
    retries: int,
    backoff: float,
    fail: Callable[[str, int | None], Exception],
    accept: Callable[[httpx.Response], bool] = _ok,
    on_lost: Callable[[], Awaitable[None]] | None = None,
    rand: Callable[[], float] = random.random,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """``method path`` on ``http``; ``peer`` names the server in messages ("the engine at URL");
    ``fail(message, status)`` builds the error raised; ``accept`` says which answers are results.

    ``on_lost`` marks a request that must not run twice (a generation): when it may have
    reached the server but its answer was lost, it is not sent again; ``on_lost()`` is
    awaited (to cancel it there) and the error raised, for the caller to redo the work
    under its own id. ``rand`` draws the backoff's jitter (tests pass a fixed one).
    ``headers`` are sent with this request over the client's own (another key, say).
    """
    for attempt in range(retries + 1):
        status: int | None = None  # of the last answer, when the last try got one (503)
        asked = 0.0  # the server's Retry-After
        try:
            resp = await http.request(method, path, json=json, headers=headers)
        except httpx.TransportError as exc:
            problem = f"cannot reach {peer}: {type(exc).__name__}: {exc}"
            if on_lost is not None and not isinstance(exc, UNSENT):
                await on_lost()
                raise fail(
                    f"{method} {path}: no answer from {peer} ({type(exc).__name__}: {exc}); not sent again, "
                    "since it may still be running there",
                    None,
                ) from exc
        else:
            if resp.status_code == 503:
                problem, status = f"{peer} is not ready (503): {resp.text[:200]}", 503
                asked = retry_after(resp)
            elif not accept(resp):
                raise fail(f"{method} {path} -> {resp.status_code}: {error_message(resp)}", resp.status_code)
            else:
                return resp
        if attempt == retries:
            raise fail(problem, status)
        delay = max(backoff_delay(attempt, backoff, rand), asked)
        log.warning("%s (attempt %d of %d); retrying in %.1fs", problem, attempt + 1, retries + 1, delay)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class RetryingClient:
    """An async HTTP client of one peer with a bearer token, retries and backoff; use it as
    an async context manager. Subclasses add the peer's endpoints."""

    def __init__(
        self, base_url: str, *, timeout: float, retries: int = 5, backoff: float = 0.5, token: str | None = None
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=5.0), headers=headers
        )
        self.retries, self.backoff = retries, backoff

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
