"""The CPU engine's HTTP server: the subset of SGLang's native API that POPE-RL uses.

    pope engine --model DIR --port 30000 [--weight-version 0]
    curl -s localhost:30000/generate -H 'Content-Type: application/json' \\
         -d '{"text": "The answer is", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}'

Request and response shapes follow SGLang 0.5.x (DESIGN.md 3); tests check them against
SGLang's own contract module. Errors answer 400 with ``{"object": "error", "message":
..., "type": "BadRequest", "code": 400}`` as SGLang does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.config import model_dir_problem
from services.common.http import uvicorn_config
from services.common.messages import parse_version
from services.engine.decode import Sequence
from services.engine.runtime import EngineRuntime, WeightLoadError
from services.engine.sampling import SamplingError, SamplingSpec, generators
from services.engine.settings import EngineSettings
from services.engine.sync_routes import add_weight_sync_routes

log = logging.getLogger(__name__)

REQUESTS = Counter("pope_engine_requests_total", "Generate requests", ["outcome"])
PROMPT_TOKENS = Counter("pope_engine_prompt_tokens_total", "Prompt tokens prefilled")
GEN_TOKENS = Counter("pope_engine_generation_tokens_total", "Tokens generated")
LATENCY = Histogram(
    "pope_engine_e2e_latency_seconds",
    "Generate request latency",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
WEIGHT_VERSION = Gauge("pope_engine_weight_version", "Weight version being served (as a number)")
QUEUE = Gauge("pope_engine_queue_depth", "Requests waiting for a batch")
RUNNING = Gauge("pope_engine_running_sequences", "Sequences in the batch being decoded")
ABORTED = Counter("pope_engine_aborted_sequences_total", "Running or queued sequences stopped by /abort_request")

DISCONNECT_POLL_S = 1.0
"""How often a /generate in progress checks that its client is still connected (SGLang: 4 s)."""


class BadRequest(ValueError):
    """The request is malformed; answered with 400 and this message."""


class ClientGone(Exception):
    """The client of a /generate disconnected before its answer was ready."""


def error(message: str, status: int = 400) -> JSONResponse:
    kind = {400: "BadRequest", 401: "Unauthorized", 503: "ServiceUnavailable"}.get(status, "Error")
    return JSONResponse({"object": "error", "message": message, "type": kind, "code": status}, status)


def _per_prompt(value: Any, n: int, name: str) -> list[Any]:
    """SGLang lets a field be one value for all prompts or a list with one per prompt."""
    if isinstance(value, list):
        if len(value) != n:
            raise BadRequest(f"{name} has {len(value)} entries for {n} prompts")
        return value
    return [value] * n


def _prompts(body: dict[str, Any], rt: EngineRuntime) -> tuple[list[list[int]], bool]:
    """The prompts as token ids, and whether the request was a batch."""
    ids, text = body.get("input_ids"), body.get("text")
    if (ids is None) == (text is None):
        raise BadRequest("give exactly one of 'text' and 'input_ids'")
    if text is not None:
        texts = text if isinstance(text, list) else [text]
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise BadRequest("'text' must be a non-empty string or a list of them")
        return [rt.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], isinstance(text, list)
    batch = isinstance(ids, list) and bool(ids) and all(isinstance(r, list) for r in ids)
    rows: list[Any] = ids if batch else [ids]  # type: ignore[assignment]
    for i, row in enumerate(rows):
        if not isinstance(row, list) or not row or not all(type(t) is int for t in row):
            raise BadRequest(
                f"input_ids[{i}] must be a non-empty list of token ids"
                if batch
                else "'input_ids' must be a non-empty list of token ids (or a list of them)"
            )
        if not all(0 <= t < rt.vocab_size for t in row):
            raise BadRequest(f"input_ids contain a token id outside [0, {rt.vocab_size})")
    return rows, batch


def _rids(rid: Any, prompts: int, batch: bool) -> list[str]:
    """Each prompt's rid as SGLang 0.5.23 names it (``GenerateReqInput._normalize_rid``): a
    single request keeps its rid; in a batch a string ``r`` names prompt i ``r_i``, a list
    must hold one distinct rid per prompt, and prompts without one get fresh ids."""
    if rid is not None and not isinstance(rid, str | list):
        raise BadRequest("The rid should be a string or a list of strings.")
    if not batch:
        given = rid[0] if isinstance(rid, list) and len(rid) == 1 else rid
        if given is not None and not isinstance(given, str):
            raise BadRequest("The rid of a single request should be a string.")
        return [given or uuid.uuid4().hex]
    if rid is None:
        return [uuid.uuid4().hex for _ in range(prompts)]
    if isinstance(rid, str):
        return [f"{rid}_{i}" for i in range(prompts)]
    if len(rid) != prompts:
        raise BadRequest("The specified rids length mismatch with the batch_size for batch processing.")
    if not all(isinstance(r, str) and r for r in rid):
        raise BadRequest("The rid should be a string or a list of strings.")
    if len(set(rid)) != len(rid):
        raise BadRequest(
            f"Duplicate request IDs detected within the request: {sorted({r for r in rid if rid.count(r) > 1})}"
        )
    return list(rid)


def _finish_reason(seq: Sequence) -> dict[str, Any]:
    kind, detail = seq.finish
    if kind == "stop":
        return {"type": "stop", "matched": detail}
    if kind == "length":
        return {"type": "length", "length": detail}
    return {"type": "abort", "message": detail}


def _text(rt: EngineRuntime, seq: Sequence) -> str:
    ids = seq.output_ids
    if seq.finish[0] == "stop" and not seq.spec.no_stop_trim:
        ids = ids[:-1]  # SGLang leaves the matched stop token out of the text
    return str(rt.tokenizer.decode(ids, skip_special_tokens=seq.spec.skip_special_tokens))


async def generate(rt: EngineRuntime, body: dict[str, Any]) -> Any:
    start = time.monotonic()
    if body.get("stream"):
        raise BadRequest("streaming is not supported by the CPU engine")
    prompts, batch = _prompts(body, rt)
    try:
        specs = [
            SamplingSpec.parse(p, rt.vocab_size)
            for p in _per_prompt(body.get("sampling_params"), len(prompts), "sampling_params")
        ]
    except SamplingError as exc:
        raise BadRequest(str(exc)) from exc
    if len({spec.n for spec in specs}) > 1:
        raise BadRequest("The parallel_sample_num should be the same for all samples in sample params.")
    logprob = _per_prompt(body.get("return_logprob") or False, len(prompts), "return_logprob")
    n = specs[0].n
    # SGLang makes a request with n > 1 a batch, and gives each of the n copies of a prompt
    # a fresh rid (tokenizer_manager._handle_batch_request): the prompt's own rid then names
    # no sequence, so an abort by it stops nothing, there as here.
    rids = _rids(body.get("rid"), len(prompts), batch or n > 1)
    text_in_logprobs = bool(body.get("return_text_in_logprobs"))

    seqs, seq_rids, rows = [], [], []
    for i, (prompt, spec) in enumerate(zip(prompts, specs, strict=True)):
        room = rt.context_len - len(prompt)
        if room <= 0:
            raise BadRequest(f"prompt {i} has {len(prompt)} tokens; the context length is {rt.context_len}")
        if spec.max_new_tokens > room:  # as SGLang does: cap the completion to the context
            spec = dataclasses.replace(spec, max_new_tokens=room)
        # The n copies share the seed under deterministic inference, as on SGLang (DESIGN.md 3).
        for gen in generators(spec, deterministic=rt.deterministic, process_rng=rt.process_rng):
            seqs.append(Sequence(prompt, spec, gen))
            seq_rids.append(rids[i] if n == 1 else uuid.uuid4().hex)
            rows.append(i)
    await rt.run(seq_rids, seqs)
    latency = time.monotonic() - start

    out = []
    for seq, i, out_id in zip(seqs, rows, seq_rids, strict=True):
        spans = seq.spans()
        meta: dict[str, Any] = {
            "id": out_id,
            "prompt_tokens": len(seq.prompt_ids),
            "completion_tokens": len(seq.output_ids),
            "cached_tokens": 0,
            "finish_reason": _finish_reason(seq),
            # As SGLang 0.5.23 reports them (sglang/srt/utils/weight_versions.py): which
            # weights made which tokens, and the last of them as weight_version.
            "weight_version": spans[-1][0],
            "weight_versions": [{"version": v, "start": a, "end": b} for v, a, b in spans],
            "e2e_latency": latency,
        }
        if logprob[i]:
            meta["output_token_logprobs"] = [
                [lp, tok, rt.tokenizer.decode([tok]) if text_in_logprobs else None]
                for lp, tok in zip(seq.logprobs, seq.output_ids, strict=True)
            ]
        out.append({"text": _text(rt, seq), "output_ids": seq.output_ids, "meta_info": meta})
        GEN_TOKENS.inc(len(seq.output_ids))
    PROMPT_TOKENS.inc(sum(len(p) for p in prompts))
    LATENCY.observe(latency)
    return out if batch or len(out) > 1 else out[0]


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


class RequireKey:
    """ASGI middleware: every path but health and metrics needs ``Authorization: Bearer
    <key>``. Plain ASGI, not ``@app.middleware``: Starlette's BaseHTTPMiddleware hides the
    client's disconnect from the route, and while_connected needs to see it."""

    OPEN = frozenset({"/health", "/health_generate", "/metrics"})

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope["path"] not in self.OPEN
        if guarded and dict(scope["headers"]).get(b"authorization") != self.expected:
            await error("missing or wrong API key", 401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


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
) -> FastAPI:
    """The FastAPI app; ``load`` is a runtime, or a function that builds one in the
    background (``on_fatal`` is called if that fails, to stop the server)."""
    slot = _Slot()

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

    if api_key:
        app.add_middleware(RequireKey, key=api_key)

    @app.exception_handler(Starting)
    async def starting(request: Request, exc: Starting) -> JSONResponse:
        return error(str(exc), 503)

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ClientDisconnect:  # the client went away before its body was in (killed, say)
            raise ClientGone from None
        except ValueError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # the client went away; nobody reads this

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return error(str(exc))

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate_route(request: Request) -> Any:
        rt = slot.get()
        QUEUE.set(rt.queue_depth)
        try:
            result = await while_connected(request, generate(rt, await json_body(request)))
        except BadRequest:
            REQUESTS.labels("bad_request").inc()
            raise
        except ClientGone:
            REQUESTS.labels("client_gone").inc()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        REQUESTS.labels("ok").inc()
        return result

    @app.post("/update_weights_from_disk")
    async def update_weights(request: Request) -> JSONResponse:
        rt = slot.get()
        body = await json_body(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise BadRequest("'model_path' is required")
        version = body.get("weight_version")
        if version is not None and not isinstance(version, str):
            raise BadRequest("'weight_version' must be a string")
        try:
            message = await asyncio.to_thread(rt.update_weights, path, version, bool(body.get("abort_all_requests")))
        except WeightLoadError as exc:
            return JSONResponse({"success": False, "message": str(exc), "num_paused_requests": 0}, 400)
        if version is not None:
            message += f" Weight version updated to {version}."
        WEIGHT_VERSION.set(_as_number(rt.weight_version))
        return JSONResponse({"success": True, "message": message, "num_paused_requests": 0})

    add_weight_sync_routes(
        app, slot.get, json_body, BadRequest, lambda rt: WEIGHT_VERSION.set(_as_number(rt.weight_version))
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
    @app.get("/get_model_info")
    async def get_model_info() -> dict[str, Any]:
        log.warning("Endpoint '/get_model_info' is deprecated (as in SGLang): use '/model_info'")
        return await model_info()

    @app.get("/health")
    async def health() -> Response:
        slot.get()
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        rt = slot.get()
        if rt.paused:  # nothing can generate by design; the server itself is fine
            return Response(status_code=200)
        spec = SamplingSpec(max_new_tokens=1, temperature=0.0)
        try:
            await asyncio.wait_for(rt.run([f"HEALTH_CHECK_{time.time()}"], [Sequence([0], spec)]), 20)
        except TimeoutError:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> PlainTextResponse:
        slot.get()
        # No prefix cache to flush: every batch starts from an empty KV cache.
        return PlainTextResponse("Cache flushed.\n")

    @app.post("/pause_generation")
    async def pause(request: Request) -> dict[str, str]:
        rt = slot.get()
        raw = await request.body()
        mode = (await json_body(request)).get("mode", "abort") if raw.strip() else "abort"
        if mode not in ("abort", "in_place", "retract"):
            raise BadRequest("'mode' must be one of 'abort', 'in_place', 'retract'")
        rt.pause(mode)  # type: ignore[arg-type]  # checked just above
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation")
    async def resume() -> dict[str, str]:
        slot.get().resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    @app.post("/abort_request")
    async def abort(request: Request) -> Response:
        body = await json_body(request)
        ABORTED.inc(slot.get().abort(body.get("rid"), abort_all=bool(body.get("abort_all"))))
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        if slot.rt is not None:
            QUEUE.set(slot.rt.queue_depth)
            RUNNING.set(slot.rt.running)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


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
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(load, key, on_fatal=stop)

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
