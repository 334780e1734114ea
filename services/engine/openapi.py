"""The engine's OpenAPI document: every route's real request body, answers and auth.

The handlers parse raw JSON (as SGLang's do, field by field, with its messages), so
FastAPI cannot infer their bodies; this module declares them as JSON Schema, with the
engine's bounds (``generation.Limits``) as ``maximum``/``maxItems``, and, once the model
is loaded, its vocabulary and context as bounds on token ids and prompt lengths. A fuzzer
(schemathesis) checks answers against these declarations, so each route lists every status
it can answer: 400 for a malformed body, 401 where a key guards it, 409 for a disk load
during a distributed update, 413 for an oversized body, 503 while the model loads.

What JSON Schema cannot say, and the engine still refuses with 400: a ``text`` that
tokenizes to the context or more; a list-valued
``sampling_params``, ``return_logprob`` or ``rid`` must have one entry per prompt, and
``names``, ``dtypes`` and ``shapes`` one per tensor; the tokens of one request (rows x n x
(prompt + max_new_tokens), max_new_tokens capped to the context) must stay within
``max_request_tokens``; ``rank_offset`` must be below ``world_size``; and joining a group
needs rank 0 listening at ``master_address:master_port`` (else 400 once
``weight_sync_timeout_s`` passed). ``/ready`` answers 503 while paused, by SGLang's design.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.routing import APIRoute

from services.engine.generation import Limits
from services.engine.guard import AuthLevel
from services.engine.runtime import EngineRuntime
from services.engine.sampling import SGLANG_DEFAULTS, SUPPORTED

Schema = dict[str, Any]

ERROR: Schema = {
    "type": "object",
    "required": ["object", "message", "type", "code"],
    "properties": {
        "object": {"const": "error"},
        "message": {"type": "string"},
        "type": {"type": "string"},
        "code": {"type": "integer"},
    },
}
UNAUTHORIZED: Schema = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
SUCCESS: Schema = {
    "type": "object",
    "required": ["success", "message"],
    "properties": {"success": {"type": "boolean"}, "message": {"type": "string"}},
}
STATUS: Schema = {
    "type": "object",
    "required": ["message", "status"],
    "properties": {"message": {"type": "string"}, "status": {"type": "string"}},
}
BOOL_OR_NULL: Schema = {"type": ["boolean", "null"]}
GROUP: Schema = {"type": "string"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: Schema, required: bool = True) -> Schema:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _obj(properties: Schema, required: tuple[str, ...] = ()) -> Schema:
    return {"type": "object", "properties": properties, "required": list(required)}


def sampling_params(limits: Limits, vocab: int | None) -> Schema:
    """SGLang's SamplingParams as the CPU engine takes them (sampling.SamplingSpec.parse)."""
    token: Schema = {"type": "integer", "minimum": 0, **({"maximum": vocab - 1} if vocab else {})}
    supported: Schema = {
        "max_new_tokens": {"type": ["integer", "null"], "minimum": 0},
        "temperature": {"type": ["number", "null"], "minimum": 0},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"anyOf": [{"type": "null"}, {"const": -1}, {"type": "integer", "minimum": 1}]},
        "min_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "n": {"type": ["integer", "null"], "minimum": 1, "maximum": limits.max_n},
        "stop_token_ids": {"type": ["array", "null"], "items": token},
        "ignore_eos": BOOL_OR_NULL,
        "skip_special_tokens": BOOL_OR_NULL,
        "no_stop_trim": BOOL_OR_NULL,
        "spaces_between_special_tokens": BOOL_OR_NULL,
        "sampling_seed": {"type": ["integer", "null"], "minimum": -(2**63), "maximum": 2**63 - 1},
    }
    assert set(supported) == SUPPORTED
    # SGLang's other parameters are taken at their defaults only (the CPU engine lacks them).
    others = {k: {"enum": [v, None, [], {}] if v is not None else [None, [], {}]} for k, v in SGLANG_DEFAULTS.items()}
    return {"type": "object", "properties": {**others, **supported}, "additionalProperties": False}


def generate_request(limits: Limits, rt: EngineRuntime | None) -> Schema:
    vocab, context = (rt.vocab_size, rt.context_len) if rt is not None else (None, None)
    token: Schema = {"type": "integer", "minimum": 0, **({"maximum": vocab - 1} if vocab else {})}
    ids: Schema = {"type": "array", "items": token, "minItems": 1, **({"maxItems": context - 1} if context else {})}
    # No maxLength: how many tokens a text makes is the tokenizer's to say (a text over
    # the context is refused with 400, as input_ids over it are).
    text: Schema = {"type": "string", "minLength": 1}
    many = {"minItems": 1, "maxItems": limits.max_prompts}
    params = sampling_params(limits, vocab)
    return {
        "type": "object",
        "properties": {
            "text": {"anyOf": [{"type": "null"}, text, {"type": "array", "items": text, **many}]},
            "input_ids": {"anyOf": [{"type": "null"}, ids, {"type": "array", "items": ids, **many}]},
            "sampling_params": {"anyOf": [{"type": "null"}, params, {"type": "array", "items": params, **many}]},
            "rid": {
                "anyOf": [
                    {"type": "null"},
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "uniqueItems": True, **many},
                ]
            },
            "return_logprob": {"anyOf": [BOOL_OR_NULL, {"type": "array", "items": {"type": "boolean"}, **many}]},
            "return_text_in_logprobs": BOOL_OR_NULL,
            "stream": {"enum": [False, None]},
        },
        # Exactly one of them given (null is not given, as in SGLang's dataclass).
        "oneOf": [
            {"required": ["text"], "properties": {"text": {"type": ["string", "array"]}}},
            {"required": ["input_ids"], "properties": {"input_ids": {"type": "array"}}},
        ],
    }


GENERATE_OUTPUT: Schema = {
    "type": "object",
    "required": ["text", "output_ids", "meta_info"],
    "properties": {
        "text": {"type": "string"},
        "output_ids": {"type": "array", "items": {"type": "integer"}},
        "meta_info": {
            "type": "object",
            "required": ["id", "prompt_tokens", "completion_tokens", "finish_reason", "weight_version"],
            "properties": {
                "id": {"type": "string"},
                "prompt_tokens": {"type": "integer"},
                "completion_tokens": {"type": "integer"},
                "cached_tokens": {"type": "integer"},
                "finish_reason": {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}},
                "weight_version": {"type": "string"},
                "weight_versions": {"type": "array", "items": {"type": "object"}},
                "e2e_latency": {"type": "number"},
                "output_token_logprobs": {"type": "array", "items": {"type": "array"}},
            },
        },
    },
}
MODEL_INFO: Schema = _obj(
    {
        "model_path": {"type": "string"},
        "tokenizer_path": {"type": "string"},
        "is_generation": {"type": "boolean"},
        "preferred_sampling_params": {"type": "null"},
        "weight_version": {"type": "string"},
    },
    ("model_path", "is_generation", "weight_version"),
)


def bodies(limits: Limits, rt: EngineRuntime | None) -> dict[str, Schema]:
    """Each POST/PUT route's request body, by path."""
    bucket = {"type": "array", "minItems": 1}
    return {
        "/generate": _body(generate_request(limits, rt)),
        "/update_weights_from_disk": _body(
            _obj(
                {
                    "model_path": {"type": "string", "minLength": 1},
                    "weight_version": {"type": ["string", "null"]},
                    "abort_all_requests": {"type": "boolean"},
                },
                ("model_path",),
            )
        ),
        "/pause_generation": _body(_obj({"mode": {"enum": ["abort", "in_place", "retract"]}}), required=False),
        "/continue_generation": _body({"type": "object"}, required=False),
        "/abort_request": _body(
            _obj(
                {
                    "rid": {"anyOf": [{"type": ["string", "null"]}, {"type": "array", "items": {"type": "string"}}]},
                    "abort_all": {"type": "boolean"},
                }
            )
        ),
        "/init_weights_update_group": _body(
            _obj(
                {
                    "master_address": {"type": "string", "minLength": 1},
                    "master_port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "rank_offset": {"type": "integer", "minimum": 1},
                    "world_size": {"type": "integer", "minimum": 2},
                    "group_name": {**GROUP, "minLength": 1},
                    "backend": {"enum": ["gloo"]},  # SGLang's default, nccl, is refused here
                },
                ("master_address", "master_port", "rank_offset", "world_size", "backend"),
            )
        ),
        "/destroy_weights_update_group": _body(_obj({"group_name": GROUP})),
        "/begin_weight_update": _body(_obj({"selector": {"enum": ["target", "draft", "all"]}})),
        "/end_weight_update": _body({"type": "object"}),
        "/update_weights_from_distributed": _body(
            _obj(
                {
                    "names": {**bucket, "items": {"type": "string"}},
                    "dtypes": {**bucket, "items": {"enum": DTYPES}},
                    "shapes": {**bucket, "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
                    "group_name": GROUP,
                    "weight_version": {"type": ["string", "null"]},
                    "load_format": {"type": ["string", "null"]},
                    "abort_all_requests": {"type": "boolean"},
                },
                ("names", "dtypes", "shapes"),
            )
        ),
    }


LOADED: Schema = {**SUCCESS, "properties": {**SUCCESS["properties"], "num_paused_requests": {"type": "integer"}}}
DTYPES = sorted(n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype))
EMPTY = {"description": "Done (no body)"}
TEXT = {"description": "Plain text", "content": {"text/plain": {"schema": {"type": "string"}}}}
SYNC = {
    "200": _json(SUCCESS, "Done"),
    "400": _json({"anyOf": [SUCCESS, ERROR]}, "Refused or malformed"),
    "404": _json(SUCCESS, "No such group"),
    "409": _json(SUCCESS, "Not now: a session already open, none open, or a group that exists"),
}
OKS: dict[str, Schema] = {
    "/generate": {"200": _json({"anyOf": [GENERATE_OUTPUT, {"type": "array", "items": GENERATE_OUTPUT}]}, "Done")},
    "/update_weights_from_disk": {
        "200": _json(LOADED, "Loaded"),
        "400": _json({"anyOf": [SUCCESS, ERROR]}, "Not loaded (the old weights keep serving) or malformed"),
        "404": _json(LOADED, "No model directory at model_path"),
        "409": _json(ERROR, "A distributed update session (begin..end) is open"),
    },
    "/pause_generation": {"200": _json(STATUS, "Paused")},
    "/continue_generation": {"200": _json(STATUS, "Continued")},
    "/abort_request": {"200": EMPTY},
    "/flush_cache": {"200": TEXT},
    "/model_info": {"200": _json(MODEL_INFO, "The served model")},
    "/get_model_info": {"200": _json(MODEL_INFO, "The served model")},
    "/server_info": {"200": _json(_obj({"enable_deterministic_inference": {"type": "boolean"}}), "Launch settings")},
    "/health": {"200": EMPTY},
    "/health_generate": {"200": EMPTY},
    "/ready": {"200": EMPTY, "503": {"description": "Starting, paused or shutting down (no body)"}},
    "/metrics": {"200": TEXT},
    **{p: SYNC for p in ("/init_weights_update_group", "/destroy_weights_update_group", "/begin_weight_update")},
    **{p: SYNC for p in ("/end_weight_update", "/update_weights_from_distributed")},
}
NO_503 = frozenset({"/ready", "/metrics"})  # answer without the model


def install_openapi(
    app: FastAPI, limits: Limits, runtime: Callable[[], EngineRuntime | None], guarded: Callable[[AuthLevel], bool]
) -> None:
    """Replace ``app.openapi`` with one that declares the engine's routes as above; it
    is computed again until the model is loaded (its bounds come from the model)."""
    plain = app.openapi
    cached: list[Schema] = []

    def openapi() -> Schema:
        if cached:
            return cached[0]
        rt = runtime()
        app.openapi_schema = None
        with warnings.catch_warnings():  # one route with two methods: its ids are set below
            warnings.filterwarnings("ignore", "Duplicate Operation ID")
            doc = plain()
        app.openapi_schema = None
        body = bodies(limits, rt)
        for route in app.routes:
            if not isinstance(route, APIRoute) or not route.include_in_schema:
                continue
            level = getattr(route.endpoint, "_auth_level", AuthLevel.NORMAL)
            key = guarded(level) and not route.path.startswith(("/health", "/ready", "/metrics"))
            for method in route.methods or ():
                op = doc["paths"][route.path][method.lower()]
                op["operationId"] = f"{method.lower()}{route.path.replace('/', '_')}"
                responses: Schema = {
                    **({"503": _json(ERROR, "The model is loading")} if route.path not in NO_503 else {}),
                    **OKS[route.path],
                }
                if route.path in body and method != "GET":
                    op["requestBody"] = body[route.path]
                    responses.setdefault("400", _json(ERROR, "Malformed body"))
                    responses["413"] = _json(ERROR, "Body over engine.max_request_bytes")
                if key:
                    responses["401"] = _json(UNAUTHORIZED, "Missing or wrong key")
                op["responses"] = responses
                op["security"] = [{"bearer": []}] if key else []
        doc.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        if rt is not None:
            cached.append(doc)
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
