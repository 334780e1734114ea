"""The one retry loop, and the shared base, of the project's HTTP clients (engine_client,
verifier_client).

Transport errors (refused, reset, timeouts) and 503 (a server starting or loading) are
retried with exponential backoff up to ``retries`` times; any other refusal raises at once.
Each client raises its own error type, so callers catch one exception per peer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import httpx

log = logging.getLogger(__name__)


def error_message(resp: httpx.Response) -> str:
    """The server's own message from an error response, short."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or data.get("detail") or data)[:500]
    return str(data)[:500]


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
) -> httpx.Response:
    """``method path`` on ``http``; ``peer`` names the server in messages ("the engine at URL");
    ``fail(message, status)`` builds the error raised; ``accept`` says which answers are results."""
    delay = backoff
    for attempt in range(retries + 1):
        try:
            resp = await http.request(method, path, json=json)
        except httpx.TransportError as exc:
            problem = f"cannot reach {peer}: {type(exc).__name__}: {exc}"
        else:
            if resp.status_code == 503:
                problem = f"{peer} is not ready (503): {resp.text[:200]}"
            elif not accept(resp):
                raise fail(f"{method} {path} -> {resp.status_code}: {error_message(resp)}", resp.status_code)
            else:
                return resp
        if attempt == retries:
            raise fail(problem, None)
        log.warning("%s (attempt %d of %d); retrying in %.1fs", problem, attempt + 1, retries + 1, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)
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
