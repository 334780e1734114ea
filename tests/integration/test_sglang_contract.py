"""The engine client against SGLang's own server source (the pinned wheel's http_server.py,
io_struct.py, sampling_params.py, auth.py and weight-update code; tests/sglang_source.py).

Every public method of ``EngineClient`` is run against a recording transport, and every
request it makes must be one SGLang routes (path and method), not one it marks
deprecated, with a body its request structure has fields for (names, required ones,
types) and sampling parameters of its ``SamplingParams``; SGLang's own auth decision must
let it through with the key and refuse it without. The CPU engine must serve every path
the client calls, and nothing SGLang does not. And the weight-update call sequence the
client follows must still be the one the pinned release needs.

In tests/integration because it fetches the wheel (``sglang_source``); it starts no server.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from services.common.engine_client import EngineClient, SamplingParams
from services.engine.guard import AuthLevel
from services.engine.server import create_app
from tests import sglang_source as sgl

KEY = "contract-key"

# Every value set, so that every sampling field the client has is sent and checked.
ALL_SAMPLING = SamplingParams(
    max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=5, n=2, stop_token_ids=[7], ignore_eos=True, sampling_seed=3
)

# One bucket of a broadcast, the last of an update (so it names the version).
SYNC_BODY = EngineClient.update_weights_from_distributed_payload(
    ["model.embed_tokens.weight", "model.norm.weight"],
    ["float32", "float32"],
    [[8, 4], [4]],
    "pope-g",
    weight_version=2,
)

# Each public method of the client, with the arguments of the calls made here; its requests
# must equal what the public payload builder beside it returns.
CALLS: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {
    "generate": [
        (([[1, 2, 3]], ALL_SAMPLING), {"rid": "g-1"}),
        (([[1, 2], [3]], SamplingParams(sampling_seed=7)), {"rid": "g-2"}),
    ],
    "update_weights_from_disk": [
        (("/weights/checkpoints/weights/step-000001", 1), {}),
        (("/weights/checkpoints/weights/step-000002@1", 2), {"lineage": 1}),
    ],
    "model_info": [((), {})],
    "weight_version": [((), {})],
    "served_version": [((), {})],
    "healthy": [((), {})],
    "ready": [((), {})],
    "pause": [((), {}), (("retract",), {})],
    "resume": [((), {})],
    "abort": [(("g-1",), {}), ((), {"abort_all": True})],
    "init_weights_update_group": [(("10.0.0.1", 29500, 1, 2, "pope-g"), {})],
    "begin_weight_update": [((), {})],
    "update_weights_from_distributed": [((SYNC_BODY,), {})],
    "end_weight_update": [((), {})],
    "destroy_weights_update_group": [(("pope-g",), {})],
}
BODIES = {
    ("generate", 0): EngineClient.generate_payload([[1, 2, 3]], ALL_SAMPLING, rid="g-1"),
    # seeded: without a seed the client draws a random base seed for each call
    ("generate", 1): EngineClient.generate_payload([[1, 2], [3]], SamplingParams(sampling_seed=7), rid="g-2"),
    ("update_weights_from_disk", 0): EngineClient.update_weights_payload("/weights/checkpoints/weights/step-000001", 1),
    ("update_weights_from_disk", 1): EngineClient.update_weights_payload(
        "/weights/checkpoints/weights/step-000002@1", 2, lineage=1
    ),
    ("pause", 0): EngineClient.pause_payload(),
    ("pause", 1): EngineClient.pause_payload("retract"),
    ("resume", 0): EngineClient.resume_payload(),
    ("abort", 0): EngineClient.abort_payload("g-1"),
    ("abort", 1): EngineClient.abort_payload(abort_all=True),
    ("init_weights_update_group", 0): EngineClient.init_weights_update_group_payload(
        "10.0.0.1", 29500, 1, 2, "pope-g", "gloo"
    ),
    ("begin_weight_update", 0): EngineClient.begin_weight_update_payload(),
    ("update_weights_from_distributed", 0): SYNC_BODY,
    ("end_weight_update", 0): EngineClient.end_weight_update_payload(),
    ("destroy_weights_update_group", 0): EngineClient.destroy_weights_update_group_payload("pope-g"),
}

SYNC_PATHS = {
    "/init_weights_update_group",
    "/begin_weight_update",
    "/update_weights_from_distributed",
    "/end_weight_update",
    "/destroy_weights_update_group",
}

Sent = tuple[str, str, Any, str | None]
"""One request: method, path, JSON body (None: none), Authorization header."""


def answer(request: httpx.Request) -> httpx.Response:
    """What an engine would answer, enough for the client to finish each call."""
    body = json.loads(request.content) if request.content else {}
    if request.url.path == "/generate":
        params = body["sampling_params"]
        n = (params[0] if isinstance(params, list) else params).get("n", 1)
        meta = {"id": "r", "prompt_tokens": 1, "completion_tokens": 1, "weight_version": "0"}
        meta |= {"finish_reason": {"type": "length", "length": 1}, "output_token_logprobs": [[-0.5, 1, None]]}
        return httpx.Response(
            200, json=[{"text": "a", "output_ids": [1], "meta_info": meta}] * (len(body["input_ids"]) * n)
        )
    if request.url.path in SYNC_PATHS:
        return httpx.Response(200, json={"success": True, "message": "Success"})
    if request.url.path == "/update_weights_from_disk":
        return httpx.Response(200, json={"success": True, "message": "ok", "num_paused_requests": 0})
    if request.url.path.endswith("model_info"):
        return httpx.Response(200, json={"model_path": "/models/base", "weight_version": "3"})
    return httpx.Response(200, json={})


@pytest.fixture(scope="module")
def sent() -> dict[tuple[str, int], list[Sent]]:
    """(method name, call index) -> the requests that call made, in order."""
    out: dict[tuple[str, int], list[Sent]] = {}

    async def run() -> None:
        for name, calls in CALLS.items():
            for i, (args, kwargs) in enumerate(calls):
                seen: list[Sent] = []

                def record(request: httpx.Request, seen: list[Sent] = seen) -> httpx.Response:
                    body = json.loads(request.content) if request.content else None
                    seen.append((request.method, request.url.path, body, request.headers.get("authorization")))
                    return answer(request)

                client = EngineClient("http://engine", api_key=KEY, retries=0)
                headers = client._http.headers
                await client._http.aclose()
                client._http = httpx.AsyncClient(base_url="http://engine", transport=httpx.MockTransport(record))
                client._http.headers.update(headers)
                async with client:
                    await getattr(client, name)(*args, **kwargs)
                out[(name, i)] = seen

    asyncio.run(run())
    return out


@pytest.fixture(scope="module")
def server(sglang_source: Path) -> sgl.Server:
    return sgl.Server.read(sglang_source)


def every_request(sent: dict[tuple[str, int], list[Sent]]) -> list[Sent]:
    return [req for reqs in sent.values() for req in reqs]


def test_every_public_method_of_the_client_is_exercised() -> None:
    public = {n for n, f in inspect.getmembers(EngineClient, inspect.iscoroutinefunction) if not n.startswith("_")}
    assert public - {"aclose"} == set(CALLS)


def test_the_client_calls_only_routes_the_pinned_server_has_and_none_it_deprecates(
    sent: dict[tuple[str, int], list[Sent]], server: sgl.Server
) -> None:
    assert server.route("GET", "/get_model_info") and server.route("GET", "/get_model_info").deprecated  # type: ignore[union-attr]
    for method, path, _body, _auth in every_request(sent):
        route = server.route(method, path)
        assert route is not None, f"SGLang routes no {method} {path}"
        assert not route.deprecated, f"{method} {path} is deprecated in the pinned SGLang ({route.handler})"


def test_every_body_is_what_the_builders_make_and_fits_the_routes_request_structure(
    sent: dict[tuple[str, int], list[Sent]], server: sgl.Server
) -> None:
    for (name, i), requests in sent.items():
        bodies = [body for _m, _p, body, _a in requests if body is not None]
        assert bodies == ([BODIES[(name, i)]] if (name, i) in BODIES else []), name
        for method, path, body, _auth in requests:
            route = server.route(method, path)
            assert route is not None
            if route.body is None:
                assert body is None, f"{method} {path} reads no body, yet the client sends {body}"
                continue
            assert isinstance(body, dict), f"{method} {path} needs a JSON object ({route.body})"
            fields = server.fields[route.body]
            unknown = set(body) - set(fields)
            assert not unknown, f"{route.body} has no field {sorted(unknown)}: SGLang would drop it silently"
            missing = {f for f, spec in fields.items() if spec.required} - set(body)
            assert not missing, f"{method} {path} lacks the required {sorted(missing)}"
            for key, value in body.items():
                assert sgl.accepts(fields[key].annotation, value), (
                    f"{route.body}.{key}: {ast.unparse(fields[key].annotation)} does not take {value!r}"
                )


def test_sampling_params_are_fields_of_sglangs_sampling_params(
    sent: dict[tuple[str, int], list[Sent]], sglang_source: Path
) -> None:
    source = (sglang_source / sgl.SAMPLING_PARAMS).read_text()
    # Fields below this comment are SGLang's own bookkeeping, set from the API ones.
    internal_from = next(i for i, line in enumerate(source.splitlines(), 1) if "--- Internal fields" in line)
    [cls] = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "SamplingParams"]
    api = {
        s.target.id: s.annotation
        for s in cls.body
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.lineno < internal_from
    }
    assert set(ALL_SAMPLING.model_dump(exclude_none=True)) == set(SamplingParams.model_fields)
    for _m, path, body, _a in every_request(sent):
        if path == "/generate":
            rows = body["sampling_params"]  # one per row of the batch (or one for all)
            for params in rows if isinstance(rows, list) else [rows]:
                assert set(params) <= set(api), f"not SGLang sampling parameters: {sorted(set(params) - set(api))}"
                for key, value in params.items():
                    # stop_token_ids is a Set[int] there: a JSON list.
                    assert key == "stop_token_ids" or sgl.accepts(api[key], value), f"sampling_params.{key}={value!r}"


def test_sglangs_auth_admits_the_client_with_the_key_and_refuses_it_without(
    sent: dict[tuple[str, int], list[Sent]], server: sgl.Server, sglang_source: Path
) -> None:
    spec = importlib.util.spec_from_file_location("sglang_auth", sglang_source / sgl.AUTH)
    assert spec is not None and spec.loader is not None
    auth = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = auth  # its dataclasses look their module up there
    spec.loader.exec_module(auth)  # stdlib only, by SGLang's design: it is imported, not parsed

    def allowed(method: str, path: str, header: str | None) -> bool:
        route = server.route(method, path)
        level = auth.AuthLevel[route.auth] if route else auth.AuthLevel.NORMAL
        decision = auth.decide_request_auth(
            method=method, path=path, authorization_header=header, api_key=KEY, admin_api_key=None, auth_level=level
        )
        return bool(decision.allowed)

    for method, path, _body, header in every_request(sent):
        assert header == f"Bearer {KEY}"
        assert allowed(method, path, header), f"SGLang --api-key refuses the client's {method} {path}"
        if path not in ("/health", "/ready"):  # probes: open by SGLang's design
            assert not allowed(method, path, None), f"{method} {path} would be open without the key"
    # What the CPU engine leaves open without a key, SGLang does too.
    for path in ("/health", "/health_generate", "/ready", "/metrics"):
        assert allowed("GET", path, None), path


def test_every_cpu_engine_route_has_sglangs_auth_level(server: sgl.Server) -> None:
    app = create_app(lambda: None)  # type: ignore[arg-type,return-value]  # never started: routes only
    for route in app.routes:
        if not isinstance(route, APIRoute) or route.path == "/metrics":  # SGLang mounts /metrics: open
            continue
        level = getattr(route.endpoint, "_auth_level", AuthLevel.NORMAL)
        for method in route.methods or ():
            theirs = server.route(method, route.path)
            assert theirs is not None, (method, route.path)
            assert level.name == theirs.auth, f"{method} {route.path}: {level.name} here, {theirs.auth} in SGLang"


def cpu_engine_routes() -> set[tuple[str, str]]:
    app = create_app(lambda: None)  # type: ignore[arg-type,return-value]  # never started: routes only
    return {(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods or ()}


def test_the_cpu_engine_serves_what_the_client_calls_and_only_names_sglang_serves(
    sent: dict[tuple[str, int], list[Sent]], server: sgl.Server
) -> None:
    cpu = cpu_engine_routes()
    for method, path, _body, _auth in every_request(sent):
        assert (method, path) in cpu, f"the CPU engine does not serve {method} {path}"
    for method, path in cpu:
        route = server.route(method, path)
        assert route is not None or (path == "/metrics" and path in server.paths()), (
            f"the CPU engine serves {method} {path}, which SGLang does not"
        )


def test_sglang_serves_metrics_on_its_main_port_with_enable_metrics(server: sgl.Server) -> None:
    assert server.metrics_mounted  # the deployments scrape port 30000 at /metrics


def test_the_weight_update_call_sequence_is_the_one_the_pinned_release_needs(
    sent: dict[tuple[str, int], list[Sent]], sglang_source: Path
) -> None:
    runner = sgl.parse(sglang_source, sgl.RUNNER_WEIGHTS)
    # begin/end are restore and post-process, for loads that do neither themselves.
    assert "restore_weights_before_loading" in sgl.calls_in(runner, "begin_weight_update", "WeightUpdater")
    assert "postprocess_weights" in sgl.calls_in(runner, "end_weight_update", "WeightUpdater")
    disk = sgl.calls_in(runner, "update_weights_from_disk", "WeightUpdater")
    disk_does_both = {"restore_weights_before_loading", "load_weights_and_postprocess"} <= disk
    scheduler = sgl.parse(sglang_source, sgl.SCHEDULER_WEIGHTS)
    in_session = {f"/{name}" for name in sgl.functions_saying(scheduler, "between begin_weight_update()")}
    assert in_session >= {"/update_weights_from_distributed", "/update_weights_from_tensor"}
    if not disk_does_both:
        in_session.add("/update_weights_from_disk")  # the client must then wrap its disk update
    pushed = {("push_broadcast", 0): push_requests()}
    for (name, _i), requests in (sent | pushed).items():
        if name == "update_weights_from_distributed":
            continue  # one call of a session by design: the push above brackets it
        paths = [path for _m, path, _b, _a in requests]
        for at, path in enumerate(paths):
            if path in in_session:
                assert "/begin_weight_update" in paths[:at] and "/end_weight_update" in paths[at + 1 :], (
                    f"{name}: {path} must run between /begin_weight_update and /end_weight_update"
                )
    assert [p for _m, p, _b, _a in sent[("update_weights_from_disk", 0)]] == ["/update_weights_from_disk"]


def push_requests() -> list[Sent]:
    """The requests of one ``broadcast.push_broadcast`` of two buckets to one engine, its
    group and its weights stand-ins (the HTTP side is what is checked)."""
    import torch

    from services.trainer import broadcast

    class Sent_:
        def wait(self, timeout: Any) -> None:
            return None

    class Group:
        def broadcast(self, tensors: Any, opts: Any) -> Sent_:
            return Sent_()

    class Weights:
        def stream_weights(self, dtype: Any, consume: Any) -> Any:
            return consume(iter([("a.weight", torch.zeros(4, 4)), ("b.weight", torch.zeros(4, 4))]))

    seen: list[Sent] = []

    def record(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, body, request.headers.get("authorization")))
        return answer(request)

    async def run() -> dict[str, Any]:
        client = EngineClient("http://engine", retries=0)
        await client._http.aclose()
        client._http = httpx.AsyncClient(base_url="http://engine", transport=httpx.MockTransport(record))
        async with client:
            conn = broadcast.Connection(client, Group(), "pope-g", store=None)
            return await broadcast.push_broadcast([conn], Weights(), torch.float32, 2, 0, 64, 5.0)  # type: ignore[arg-type]

    assert asyncio.run(run()) == {"http://engine": None}
    updates = [body for _m, path, body, _a in seen if path == "/update_weights_from_distributed"]
    assert len(updates) == 2 and "weight_version" not in updates[0] and updates[1]["weight_version"] == "2"
    assert all(body["load_format"] == "flattened_bucket" for body in updates)
    return seen


def test_the_flattened_bucket_is_sglangs(sglang_source: Path) -> None:
    """SGLang's receiver lays a bucket's tensors end to end in one uint8 tensor, offsets
    aligned to their dtype, and reads it back by view and reshape: the trainer packs so."""
    import torch

    from services.trainer import broadcast

    source = (sglang_source / sgl.TENSOR_BUCKET).read_text()
    assert "torch.uint8" in source and "offset % dtype.itemsize" in source and ".view(meta.dtype)" in source
    runner = (sglang_source / sgl.RUNNER_WEIGHTS).read_text()
    assert 'load_format == "flattened_bucket"' in runner and "FlattenedTensorBucket.empty" in runner
    tensors = [("x", torch.arange(6.0).reshape(2, 3)), ("y", torch.arange(4, dtype=torch.float16))]
    [(bucket, last)] = list(broadcast.buckets(tensors, 1 << 20))
    assert last and bucket.flat.dtype == torch.uint8 and bucket.flat.numel() == 6 * 4 + 4 * 2
    assert bucket.dtypes == ["float32", "float16"] and bucket.shapes == [[2, 3], [4]]
    assert torch.equal(bucket.flat[:24].view(torch.float32).reshape(2, 3), tensors[0][1])
