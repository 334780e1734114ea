"""The engine's ASGI guards: SGLang 0.5.23's API-key rule and a request body limit.

Both are plain ASGI middleware, not ``@app.middleware``: Starlette's BaseHTTPMiddleware
hides the client's disconnect from the route, and ``server.while_connected`` needs to see
it (SGLang's own auth middleware is ASGI-native for the same reason).

Auth follows ``sglang/srt/utils/auth.py`` (``decide_request_auth``): a route's level is an
attribute of its endpoint (``@auth_level``), found by matching the request to the app's
routes; unmatched paths are NORMAL.

- OPTIONS, and paths starting with /health, /ready or /metrics: always open (probes and
  Prometheus hold no secret).
- NORMAL routes: the api key when one is set, else open (also with only an admin key).
- ADMIN_OPTIONAL routes (weight updates, pause, continue, abort, flush_cache): the admin
  key when one is set (the api key then does not open them), else the api key when set,
  else open.

A refusal answers 401 ``{"error": "Unauthorized"}`` (SGLang's body), the scheme
"Bearer" matched case-insensitively and the key compared in constant time.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any, TypeVar

from fastapi.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.http import token_matches

F = TypeVar("F", bound=Callable[..., Any])


class AuthLevel(StrEnum):
    """SGLang's per-endpoint levels (ADMIN_FORCE is unused: no route of this engine has it)."""

    NORMAL = "normal"
    ADMIN_OPTIONAL = "admin_optional"


def auth_level(level: AuthLevel) -> Callable[[F], F]:
    """Mark an endpoint with its level, as SGLang's decorator of the same name does."""

    def mark(func: F) -> F:
        func._auth_level = level  # type: ignore[attr-defined]
        return func

    return mark


def allowed(
    method: str, path: str, header: str | None, api_key: str | None, admin_key: str | None, level: AuthLevel
) -> bool:
    """SGLang 0.5.23's decision (``decide_request_auth``) for the levels this engine has."""
    if method == "OPTIONS" or path.startswith(("/health", "/ready", "/metrics")):
        return True
    if level is AuthLevel.ADMIN_OPTIONAL and admin_key:
        return token_matches(header, admin_key)
    if api_key:
        return token_matches(header, api_key)
    return True


def route_level(app: Any, scope: Scope) -> AuthLevel:
    """The level of the route ``scope`` matches (NORMAL when none does)."""
    for route in app.router.routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            level = getattr(child.get("endpoint") or getattr(route, "endpoint", None), "_auth_level", None)
            return level if isinstance(level, AuthLevel) else AuthLevel.NORMAL
    return AuthLevel.NORMAL


class RequireKeys:
    """ASGI middleware enforcing ``allowed`` for every HTTP request."""

    def __init__(self, app: ASGIApp, *, fastapi_app: Any, api_key: str | None, admin_key: str | None) -> None:
        self.app, self.fastapi_app = app, fastapi_app
        self.api_key, self.admin_key = api_key, admin_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization")
            level = route_level(self.fastapi_app, scope)
            text = header.decode("latin-1") if header is not None else None
            if not allowed(scope["method"], scope["path"], text, self.api_key, self.admin_key, level):
                await JSONResponse({"error": "Unauthorized"}, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    """Raised from ``receive`` once a body passed the limit; answered 413."""


def too_large(limit: int) -> JSONResponse:
    message = f"Request body is larger than the engine's limit of {limit} bytes (engine.max_request_bytes)."
    return JSONResponse({"object": "error", "message": message, "type": "RequestTooLarge", "code": 413}, 413)


class LimitBody:
    """ASGI middleware: a body over ``limit`` bytes answers 413. Refused at once on its
    Content-Length; otherwise counted as it arrives, the route's read stopped at the chunk
    that passes the limit, so no more than the limit and one chunk is ever held."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:  # h11 checks its form
            await too_large(self.limit)(scope, receive, send)
            return
        seen, started = 0, False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not started:
                await too_large(self.limit)(scope, receive, send)
