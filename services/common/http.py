"""HTTP pieces every service shares: /healthz, /readyz, /metrics, and bearer-token auth.

app = FastAPI(lifespan=...)
add_health_routes(app, ready=lambda: check_redis_and_workers())
@app.post("/v1/things", dependencies=[Depends(bearer(settings.api_token))]) ...
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr
from redis.asyncio import Redis

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


def bearer(token: SecretStr | None) -> Callable[[Request], Awaitable[None]]:
    """A dependency requiring 'Authorization: Bearer <token>' when a token is configured."""

    async def check(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        expected = f"Bearer {token.get_secret_value()}"
        if not hmac.compare_digest(got.encode(), expected.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return check


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
    ``REQUESTS_GRACE_S`` after a stop is asked are cancelled."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
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
