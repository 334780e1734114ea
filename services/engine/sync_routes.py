"""The CPU engine's routes of broadcast weight sync (weight_sync.py has the protocol).

Request fields are SGLang 0.5.23's (``io_struct.InitWeightsUpdateGroupReqInput``,
``UpdateWeightsFromDistributedReqInput``, ``DestroyWeightsUpdateGroupReqInput``,
``BeginWeightUpdateReqInput``, ``EndWeightUpdateReqInput``); every route answers
``{"success", "message"}``, 200 on success and 400 on failure, as SGLang's do, but 409 for
a call refused for the engine's state and 404 for a group it lacks (WeightSyncError).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.engine.runtime import EngineRuntime, WeightLoadError
from services.engine.weight_sync import WeightSyncError, tensor_specs

DEFAULT_GROUP = "weight_update_group"  # SGLang's default group_name


def answer(success: bool, message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"success": success, "message": message}, 200 if success else status)


def add_weight_sync_routes(
    app: FastAPI,
    runtime: Callable[[], EngineRuntime],
    json_body: Callable[[Request], Awaitable[dict[str, Any]]],
    bad_request: type[Exception],
    on_loaded: Callable[[EngineRuntime], None],
    admin: Callable[[Any], Any],
) -> None:
    """Add the five routes; ``on_loaded`` runs after new weights were swapped in, and
    ``admin`` marks each as SGLang marks them (``AuthLevel.ADMIN_OPTIONAL``)."""

    def field(body: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
        value = body.get(name, default)
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON Schema's integer: 5.0 is one
        if value is ... or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise bad_request(f"'{name}' is required and must be {kind.__name__}")
        return value

    @app.post("/init_weights_update_group")
    @admin
    async def init_group(request: Request) -> JSONResponse:
        rt = runtime()
        body = await json_body(request)
        address, port = field(body, "master_address", str), field(body, "master_port", int)
        if not address or not 1 <= port <= 65535:  # else the rendezvous waits out its timeout on nothing
            raise bad_request("'master_address' must be a host and 'master_port' in 1..65535")
        offset, size = field(body, "rank_offset", int), field(body, "world_size", int)
        name, backend = field(body, "group_name", str, DEFAULT_GROUP), field(body, "backend", str, "nccl")
        if backend != "gloo":
            return answer(False, f"Failed to initialize custom process group: the CPU engine has gloo, not {backend}.")
        try:
            await asyncio.to_thread(rt.weight_groups.init, address, port, offset, size, name)
        except WeightSyncError as exc:
            return answer(False, str(exc), exc.status)
        return answer(True, "Succeeded to initialize custom process group.")

    @app.post("/destroy_weights_update_group")
    @admin
    async def destroy_group(request: Request) -> JSONResponse:
        rt = runtime()
        name = field(await json_body(request), "group_name", str, DEFAULT_GROUP)
        try:
            rt.weight_groups.destroy(name)
        except WeightSyncError as exc:
            return answer(False, str(exc), exc.status)
        return answer(True, "Succeeded to destroy custom process group.")

    @app.post("/begin_weight_update")
    @admin
    async def begin(request: Request) -> JSONResponse:
        rt = runtime()
        selector = field(await json_body(request), "selector", str, "all")
        if selector not in ("target", "draft", "all"):
            raise bad_request("'selector' must be one of 'target', 'draft', 'all'")
        try:
            rt.weight_groups.begin()
        except WeightSyncError as exc:
            return answer(False, str(exc), exc.status)
        return answer(True, "Success")

    @app.post("/end_weight_update")
    @admin
    async def end(request: Request) -> JSONResponse:
        rt = runtime()
        await json_body(request)
        try:
            rt.weight_groups.end()
        except WeightSyncError as exc:
            return answer(False, str(exc), exc.status)
        return answer(True, "Success")

    @app.post("/update_weights_from_distributed")
    @admin
    async def update(request: Request) -> JSONResponse:
        rt = runtime()
        body = await json_body(request)
        version = body.get("weight_version")
        if version is not None and not isinstance(version, str):
            raise bad_request("'weight_version' must be a string")
        try:
            specs = tensor_specs(body.get("names"), body.get("dtypes"), body.get("shapes"))
        except WeightSyncError as exc:
            raise bad_request(str(exc)) from exc
        flattened = body.get("load_format") == "flattened_bucket"
        name, abort_all = field(body, "group_name", str, DEFAULT_GROUP), bool(body.get("abort_all_requests"))
        if abort_all:  # as SGLang's tokenizer manager: before the receive
            rt.abort(abort_all=True)
        try:
            named = await asyncio.to_thread(rt.weight_groups.receive, name, specs, flattened)
            message = await asyncio.to_thread(rt.load_tensors, named, version, abort_all)
        except WeightSyncError as exc:
            return answer(False, str(exc), exc.status)
        except WeightLoadError as exc:
            return answer(False, str(exc))
        on_loaded(rt)
        if version is not None:
            message += f" Weight version updated to {version}."
        return answer(True, message)
