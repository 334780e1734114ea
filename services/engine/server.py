"""The CPU engine's HTTP server: the subset of SGLang's native API that POPE-RL uses.

    pope engine --model DIR --port 30000 [--weight-version 0]
    curl -s localhost:30000/generate -H 'Content-Type: application/json' \\
         -d '{"text": "The answer is", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}'

Request and response shapes follow SGLang 0.5.x (DESIGN.md 3); tests check them against
SGLang's own contract module. Errors answer ``{"object": "error", "message": ..., "type":
..., "code": <status>}`` as SGLang does (400 for a malformed body of any route, never a
500; 409, 413 and 503 as ``openapi.py`` declares them); auth refusals are SGLang's
``{"error": "Unauthorized"}`` (guard.py). /openapi.json declares every route's body,
bounds and answers (openapi.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest
from starlette.requests import ClientDisconnect

from services.common.config import model_dir_problem
from services.common.http import uvicorn_config
from services.common.messages import parse_version
from services.engine.decode import Sequence
from services.engine.generation import BadRequest, ClientGone, Limits, generate
from services.engine.guard import AuthLevel, LimitBody, RequireKeys, auth_level
from services.engine.openapi import install_openapi
from services.engine.runtime import EngineRuntime, WeightLoadError, WeightsNotFound, WeightUpdateBusy
from services.engine.sampling import SamplingSpec
from services.engine.settings import EngineSettings
from services.engine.sglang_metrics import SglangMetrics
from services.engine.sync_routes import add_weight_sync_routes

log = logging.getLogger(__name__)

REQUESTS = Counter("pope_engine_requests_total", "Generate requests", ["outcome"])
WEIGHT_VERSION = Gauge("pope_engine_weight_version", "Weight version being served (as a number)")
QUEUE = Gauge("pope_engine_queue_depth", "Requests waiting for a batch")
RUNNING = Gauge("pope_engine_running_sequences", "Sequences in the batch being decoded")
ABORTED = Counter("pope_engine_aborted_sequences_total", "Running or queued sequences stopped by /abort_request")

DISCONNECT_POLL_S = 1.0
"""How often a /generate in progress checks that its client is still connected (SGLang: 4 s)."""

ADMIN = auth_level(AuthLevel.ADMIN_OPTIONAL)


def error(message: str, status: int = 400) -> JSONResponse:
    kind = {
        400: "BadRequest",
        401: "Unauthorized",
        409: "Conflict",
        413: "RequestTooLarge",
        503: "ServiceUnavailable",
    }.get(status, "Error")
    return JSONResponse({"object": "error", "message": message, "type": kind, "code": status}, status)


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"request body is not valid JSON: {name} is not a JSON value")


def parse_json(raw: bytes) -> Any:
    """Strict JSON (RFC 8259): NaN and Infinity are refused, and so are bodies that are not
    UTF-8 or nest too deep for the parser (RecursionError), all as 400."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8") from None
    except RecursionError:
        raise BadRequest("request body is not valid JSON: nested too deep") from None
    except ValueError as exc:  # JSONDecodeError, and ints of more digits than Python converts
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


async def while_connected(request: Request, work: Coroutine[Any, Any, Any]) -> Any:
    """``work``'s result, or ClientGone once the client has disconnected, with ``work``
    cancelled (so its sequences are aborted). SGLang's server does the same for a
    non-streaming request, so a caller that timed out or crashed leaves nothing decoding."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Slot:
    """The runtime once loaded; the server answers 503 until then (SGLang does too)."""

    def __init__(self) -> None:
        self.rt: EngineRuntime | None = None
        self.error: str | None = None

    def get(self) -> EngineRuntime:
        if self.rt is None:
            raise Starting(self.error or "the engine is starting: loading the model")
        return self.rt


class Starting(RuntimeError):
    """Answered with 503 while the model loads (or after it failed to)."""


def create_app(
    load: EngineRuntime | Callable[[], EngineRuntime],
    api_key: str | None = None,
    on_fatal: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGTERM),
    *,
    admin_key: str | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """The FastAPI app; ``load`` is a runtime, or a function that builds one in the
    background (``on_fatal`` is called if that fails, to stop the server). ``api_key`` and
    ``admin_key`` are SGLang's --api-key and --admin-api-key (guard.py)."""
    slot, limits = _Slot(), limits or Limits()

    def start(rt: EngineRuntime) -> None:
        rt.start()
        WEIGHT_VERSION.set(_as_number(rt.weight_version))
        slot.rt = rt

    def load_in_background(factory: Callable[[], EngineRuntime]) -> None:
        try:
            start(factory())
        except Exception as exc:
            slot.error = f"the engine failed to start: {type(exc).__name__}: {exc}"
            log.exception("failed to load the model; shutting down")
            on_fatal()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(load, EngineRuntime):
            start(load)
        else:
            threading.Thread(target=load_in_background, args=(load,), name="load", daemon=True).start()
        yield
        if slot.rt is not None:
            slot.rt.stop()

    app = FastAPI(title="POPE-RL CPU engine (SGLang native API subset)", lifespan=lifespan)
    app.state.slot = slot
    # Added last runs first: the size limit holds for every request, keyed or not.
    app.add_middleware(RequireKeys, fastapi_app=app, api_key=api_key or None, admin_key=admin_key or None)
    app.add_middleware(LimitBody, limit=limits.max_request_bytes)

    @app.exception_handler(Starting)
    async def starting(request: Request, exc: Starting) -> JSONResponse:
        return error(str(exc), 503)

    async def json_body(request: Request, *, empty_ok: bool = False) -> dict[str, Any]:
        """The body as a JSON object; ``empty_ok``: an empty body is ``{}`` (SGLang's defaults)."""
        try:
            raw = await request.body()
        except ClientDisconnect:  # the client went away before its body was in (killed, say)
            raise ClientGone from None
        if empty_ok and not raw.strip():
            return {}
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # the client went away; nobody reads this

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return error(str(exc))

    @app.exception_handler(WeightUpdateBusy)
    async def busy(request: Request, exc: WeightUpdateBusy) -> JSONResponse:
        return error(str(exc), 409)

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate_route(request: Request) -> Any:
        rt = slot.get()
        QUEUE.set(rt.queue_depth)
        try:
            result = await while_connected(request, generate(rt, await json_body(request), limits))
        except BadRequest:
            REQUESTS.labels("bad_request").inc()
            raise
        except ClientGone:
            REQUESTS.labels("client_gone").inc()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        REQUESTS.labels("ok").inc()
        return result

    @app.post("/update_weights_from_disk")
    @ADMIN
    async def update_weights(request: Request) -> JSONResponse:
        rt = slot.get()
        body = await json_body(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise BadRequest("'model_path' is required and must be a non-empty string")
        version = body.get("weight_version")
        if version is not None and not isinstance(version, str):
            raise BadRequest("'weight_version' must be a string")  # any string, as SGLang takes
        abort_all = body.get("abort_all_requests", False)
        if not isinstance(abort_all, bool):
            raise BadRequest("'abort_all_requests' must be a boolean")
        try:
            message = await asyncio.to_thread(rt.update_weights, path, version, abort_all)
        except WeightUpdateBusy:
            raise
        except WeightLoadError as exc:  # the old weights keep serving
            status = 404 if isinstance(exc, WeightsNotFound) else 400
            return JSONResponse({"success": False, "message": str(exc), "num_paused_requests": 0}, status)
        if version is not None:
            message += f" Weight version updated to {version}."
        WEIGHT_VERSION.set(_as_number(rt.weight_version))
        return JSONResponse({"success": True, "message": message, "num_paused_requests": 0})

    add_weight_sync_routes(
        app, slot.get, json_body, BadRequest, lambda rt: WEIGHT_VERSION.set(_as_number(rt.weight_version)), ADMIN
    )

    @app.get("/model_info")
    async def model_info() -> dict[str, Any]:
        rt = slot.get()
        return {
            "model_path": rt.model_path,
            "tokenizer_path": rt.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": rt.weight_version,
        }

    @app.get("/server_info")
    async def server_info() -> dict[str, Any]:
        """Of the launch settings SGLang's /server_info reports, the one a client may need:
        whether sampling_seed counts (SGLang reports it at the top level, under this name)."""
        return {"enable_deterministic_inference": slot.get().deterministic}

    # SGLang still serves the old name and warns on every call, as this does; the client
    # never calls it (tests/integration/test_sglang_contract.py).
    @app.get("/get_model_info", deprecated=True)
    async def get_model_info() -> dict[str, Any]:
        log.warning("Endpoint '/get_model_info' is deprecated (as in SGLang): use '/model_info'")
        return await model_info()

    @app.get("/health")
    async def health() -> Response:
        slot.get()
        return Response(status_code=200)

    @app.get("/ready")
    async def ready() -> Response:
        """SGLang 0.5.23's readiness (``TokenizerManager.is_ready``): 200 once started and
        while not paused, else 503, so a caller can tell an engine left paused."""
        rt = slot.rt
        return Response(status_code=200 if rt is not None and not rt.paused and not rt.closing else 503)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        rt = slot.get()
        if rt.paused:  # nothing can generate by design; the server itself is fine
            return Response(status_code=200)
        spec = SamplingSpec(max_new_tokens=1, temperature=0.0)
        try:
            await asyncio.wait_for(rt.run([f"HEALTH_CHECK_{time.time()}"], [Sequence([0], spec)]), 20)
        except TimeoutError:
            return error("no token generated within 20 s", 503)
        return Response(status_code=200)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    @ADMIN
    async def flush_cache() -> PlainTextResponse:
        slot.get()
        # No prefix cache to flush: a row's KV cache is its own and leaves with it.
        return PlainTextResponse("Cache flushed.\n")

    @app.post("/pause_generation")
    @ADMIN
    async def pause(request: Request) -> dict[str, str]:
        rt = slot.get()
        mode = (await json_body(request, empty_ok=True)).get("mode", "abort")
        if mode not in ("abort", "in_place", "retract"):
            raise BadRequest("'mode' must be one of 'abort', 'in_place', 'retract'")
        rt.pause(mode)
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation")
    @ADMIN
    async def resume(request: Request) -> dict[str, str]:
        rt = slot.get()
        await json_body(request, empty_ok=True)
        rt.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    @app.post("/abort_request")
    @ADMIN
    async def abort(request: Request) -> Response:
        rt = slot.get()
        body = await json_body(request)
        rid, abort_all = body.get("rid"), body.get("abort_all", False)
        if not isinstance(abort_all, bool):
            raise BadRequest("'abort_all' must be a boolean")
        many = isinstance(rid, list) and all(isinstance(r, str) for r in rid)
        if rid is not None and not isinstance(rid, str) and not many:
            raise BadRequest("The rid should be a string or a list of strings.")
        if abort_all:
            ABORTED.inc(rt.abort(abort_all=True))
        else:
            ABORTED.inc(sum(rt.abort(one) for one in (rid if isinstance(rid, list) else [rid])))
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        if slot.rt is not None:
            rt = slot.rt
            QUEUE.set(rt.queue_depth)
            RUNNING.set(rt.running)
            SglangMetrics(rt.model_path).scheduler_state(rt.running, rt.queued, rt.last_rate)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    install_openapi(app, limits, lambda: slot.rt, guarded=lambda level: _guarded(level, api_key, admin_key))
    return app


def _guarded(level: AuthLevel, api_key: str | None, admin_key: str | None) -> bool:
    """Whether a route of ``level`` needs a key on this server (guard.allowed's rule)."""
    return bool(api_key or (level is AuthLevel.ADMIN_OPTIONAL and admin_key))


def _as_number(version: str) -> float:
    """The step of a weight version name ("12", or "12@3" in lineage 3) for the gauge;
    NaN for a name the trainer did not make."""
    try:
        return float(parse_version(version)[0])
    except ValueError:
        return float("nan")


def serve(settings: EngineSettings) -> None:
    """Load the model and serve until SIGTERM/SIGINT (uvicorn handles both gracefully)."""
    import uvicorn

    from services.common.logs import log_resolved_config, setup_logging

    setup_logging("engine", settings.log_level, settings.log_format)
    log_resolved_config(settings)
    if not settings.model_path:
        raise SystemExit("pope engine: no model given (--model DIR, or engine.model_path in the config)")
    torch.set_num_threads(settings.torch_threads or torch.get_num_threads())
    model_path = settings.model_path

    def load() -> EngineRuntime:
        return EngineRuntime(
            model_path,
            weight_version=str(settings.weight_version),
            device=settings.device,
            dtype=getattr(torch, settings.dtype),
            max_batch=settings.max_batch,
            batch_wait_ms=settings.batch_wait_ms,
            deterministic=settings.enable_deterministic_inference,
            weight_sync_timeout_s=settings.weight_sync_timeout_s,
        )

    if problem := model_dir_problem(model_path, "engine"):
        raise SystemExit(problem)
    key = settings.api_key.get_secret_value() if settings.api_key else None
    admin = settings.admin_api_key.get_secret_value() if settings.admin_api_key else None
    limits = Limits(
        max_request_bytes=settings.max_request_bytes,
        max_prompts=settings.max_prompts_per_request,
        max_n=settings.max_n,
        max_request_tokens=settings.max_request_tokens,
    )
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(load, key, on_fatal=stop, admin_key=admin, limits=limits)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            """SIGTERM/SIGINT: uvicorn waits for the requests in flight, and a generation can
            run for minutes, so they are all aborted first (answered with finish_reason
            abort), on the event loop: a signal handler must not wait for the runtime's locks."""
            super().handle_exit(sig, frame)
            rt: EngineRuntime | None = app.state.slot.rt
            if rt is not None:
                with contextlib.suppress(RuntimeError):  # no loop running: no request either
                    asyncio.get_running_loop().call_soon_threadsafe(rt.close)

    server = Server(uvicorn_config(app, settings))
    server.run()
    if app.state.slot.error:
        raise SystemExit(f"pope engine: {app.state.slot.error}")
