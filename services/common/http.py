"""HTTP pieces every service shares: the app with its auth and bounds, /healthz, /readyz, /metrics.

    app = api_app(settings, title="POPE-RL thing", lifespan=...)
    add_health_routes(app, ready=lambda: check_redis_and_workers())
    @app.post("/v1/things") ...        # needs the bearer token when settings.api_token is set

``api_app`` is where every service's HTTP surface is secured, in one place: with
``api_token`` set every mutating request (POST, PUT, PATCH, DELETE) needs
``Authorization: Bearer <token>``, and with ``require_auth_for_reads`` every read too, but
for ``OPEN_PATHS`` (probes, scrapers and the API's description); a body over
``max_body_bytes`` is a 413 before it is buffered; a request that fails validation is a 422
whose body can always be written (a NaN in the input is echoed as a string); the OpenAPI
document declares the bearer scheme on exactly the operations that need it, so /docs can
authorize and a fuzzer can check that none ignores it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security.utils import get_authorization_scheme_param
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr
from redis.asyncio import Redis
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.config import ServiceSettings

log = logging.getLogger(__name__)

REQUESTS_GRACE_S = 5
"""After SIGTERM, how long requests in flight may run before uvicorn cancels them (then the
lifespan's shutdown runs): a stop of the whole stack has a deadline (services/stack.py)."""

ReadyCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, else the reason it is not (shown in the 503 body)."""


def add_health_routes(app: FastAPI, ready: ReadyCheck) -> None:
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}  # the process is up and serving HTTP

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        reason = await ready()
        if reason is not None:
            return JSONResponse({"status": "not ready", "reason": reason}, 503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


DASHBOARD_PATHS = frozenset({"/", "/dashboard/dashboard.js", "/dashboard/dashboard.css"})
"""The rollout service's dashboard page and its two files (rollout/dashboard.py): the same
for everyone, no data; the page reads the API with the token when reads need it."""

OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", *DASHBOARD_PATHS}
)
"""Never behind the token: probes and Prometheus carry no secret, and these show no data."""

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

BEARER_SCHEME = "bearer"
"""The OpenAPI security scheme's name (components.securitySchemes)."""


def needs_token(method: str, path: str, reads_locked: bool) -> bool:
    """Whether a request needs the bearer token, when one is configured."""
    if path in OPEN_PATHS or method == "OPTIONS":
        return False
    return method in MUTATING or reads_locked


def token_matches(header: str | None, token: SecretStr | str) -> bool:
    """``Authorization: Bearer <token>``, the scheme's name in any case (RFC 6750 sec. 2.1
    via RFC 7235: auth schemes are case-insensitive); compared in constant time. The
    engine's keys are checked by it too (SGLang's rule is the same)."""
    scheme, credentials = get_authorization_scheme_param(header)
    expected = token.get_secret_value() if isinstance(token, SecretStr) else token
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.encode(), expected.encode())


def api_app(settings: ServiceSettings, **fastapi_kwargs: Any) -> FastAPI:
    """A service's FastAPI app with its auth, body limit and error handling (module doc)."""
    token, reads_locked = settings.api_token, settings.require_auth_for_reads
    app = FastAPI(**fastapi_kwargs)
    limit_mib = settings.max_body_bytes / 2**20
    too_large_body = {"detail": f"the request body is over {limit_mib:g} MiB (max_body_bytes)"}
    # Starlette's limit counts the bytes as they arrive (FastAPI turns its signal into a 413
    # HTTPException, reworded below); outside it, a declared length over the limit is
    # answered at once, in JSON (Starlette's own answer to that is plain text).
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_body_bytes)
    app.add_middleware(DeclaredLengthLimit, limit=settings.max_body_bytes, body=too_large_body)
    if token is not None:  # outermost: a request without the token is refused before a byte of its body is read
        app.add_middleware(RequireToken, token=token, reads_locked=reads_locked, routes=lambda: app.router.routes)

    @app.exception_handler(StarletteHTTPException)
    async def too_large(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 413 and exc.detail == "Content Too Large":  # the body limit's own
            exc = StarletteHTTPException(413, too_large_body["detail"])
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc)

    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain_openapi()
            if token is not None:
                declare_bearer(schema, reads_locked)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


class RequireToken:
    """ASGI middleware: a request for a route that ``needs_token``, without the token, is
    answered 401 at once. Not a FastAPI dependency: those run after the body is read and
    parsed, so anyone could make a service buffer and parse ``max_body_bytes`` of JSON on
    its event loop. A method or path no route serves goes on to its 405 or 404."""

    def __init__(self, app: ASGIApp, token: SecretStr, reads_locked: bool, routes: Callable[[], list[Any]]) -> None:
        self.app, self.token, self.reads_locked, self.routes = app, token, reads_locked, routes

    def _routed(self, scope: Scope) -> bool:
        return any(route.matches(scope)[0] is Match.FULL for route in self.routes())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and needs_token(scope["method"], scope["path"], self.reads_locked)
        if guarded and self._routed(scope):
            header = dict(scope["headers"]).get(b"authorization")
            if not token_matches(header.decode("latin-1") if header is not None else None, self.token):
                response = JSONResponse(
                    {"detail": "missing or wrong bearer token"}, 401, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class DeclaredLengthLimit:
    """ASGI middleware: a request whose Content-Length is over ``limit`` is answered 413
    with ``body`` at once, before a byte of it is read."""

    def __init__(self, app: ASGIApp, limit: int, body: dict[str, Any]) -> None:
        self.app, self.limit, self.body = app, limit, body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.limit:
                await JSONResponse(self.body, 413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def declare_bearer(schema: dict[str, Any], reads_locked: bool) -> None:
    """Mark the operations that need the token (and their 401) in an OpenAPI document."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[BEARER_SCHEME] = {"type": "http", "scheme": "bearer"}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if needs_token(method.upper(), path, reads_locked):
                operation["security"] = [{BEARER_SCHEME: []}]
                operation.setdefault("responses", {})["401"] = {
                    "description": "missing or wrong bearer token",
                    "content": {"application/json": {"schema": DETAIL_SCHEMA}},
                }


DETAIL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}
"""The body of an HTTPException's answer: ``{"detail": "<why>"}``."""


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for ``exc``, but writable whatever the input held: JSON has no NaN or
    infinity, so those are echoed back as strings (FastAPI's own handler fails on them, a 500)."""
    return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, 422)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def redis_unready(redis: Redis) -> str | None:
    """A /readyz check: None when Redis answers, else why not."""
    try:
        await redis.ping()  # type: ignore[misc]
    except Exception as exc:
        return f"redis unreachable: {exc}"
    return None


def stop_if_failed(app: FastAPI, task: asyncio.Task[None], what: str) -> None:
    """Done-callback for a service's main loop: a loop that raised is a bug, so record it
    (``/readyz`` reports it), log it, and stop the process, which ``serve`` then exits
    non-zero, rather than serve a healthy-looking service that does nothing."""
    if task.cancelled() or task.exception() is None:
        return
    app.state.failed = f"the {what} failed: {task.exception()!r}"
    log.error("the %s failed; stopping", what, exc_info=task.exception())
    server = getattr(app.state, "server", None)
    if server is not None:  # a clean stop; ``serve`` then exits with the failure's message
        server.should_exit = True
    else:  # not run by ``serve``
        os.kill(os.getpid(), signal.SIGTERM)


def uvicorn_config(app: FastAPI, settings: Any) -> Any:
    """uvicorn's config for a service: its host, port and log level; requests still running
    ``REQUESTS_GRACE_S`` after a stop is asked are cancelled. No log config of uvicorn's own:
    its loggers go through the service's handler and format (common/logs.py)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,
        timeout_graceful_shutdown=REQUESTS_GRACE_S,
    )


def stop_while_starting(service: str) -> None:
    """Until it serves, a service told to stop (SIGTERM) exits at once, 0, with a line
    saying so, instead of dying of the signal: while it imports and builds its parts it
    holds nothing. ``serve`` gives SIGTERM back to uvicorn's own handling."""

    def stop(signum: int, _frame: Any) -> None:
        print(f"pope {service}: stopped by {signal.Signals(signum).name} while starting", file=sys.stderr, flush=True)
        # Not SystemExit: code being imported may catch BaseException and go on starting
        # (seen: the line printed, then the trainer came up and ignored the stop).
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)


def serve(app: FastAPI, settings: Any, service: str) -> None:
    """Run ``app`` under uvicorn with the service's settings until SIGTERM/SIGINT."""
    import uvicorn

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # uvicorn's from here (stop_while_starting)
    config = uvicorn_config(app, settings)
    # Not by a signal: uvicorn re-raises a signal it caught, and the message below would be lost.
    app.state.server = uvicorn.Server(config)
    app.state.server.run()
    if not app.state.server.started:  # the port taken, a start-up that raised: logged above
        raise SystemExit(f"pope {service}: the server did not start (see the lines above)")
    failed = getattr(app.state, "failed", None)
    if failed:
        raise SystemExit(f"pope {service}: {failed}")
