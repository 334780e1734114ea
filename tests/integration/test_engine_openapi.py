"""The engine's OpenAPI document declares every route's real body, answers and auth
(services/engine/openapi.py), and the engine's answers match it: a fuzzer checks the
engine against this document, so a route without a declared body or error answer, or an
answer outside its declaration, is a bug here."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from services.engine.generation import Limits
from services.engine.server import create_app
from tests.conftest import running_engine

NO_BODY = {("post", "/flush_cache")}  # SGLang's takes none
NO_MODEL = {"/ready", "/metrics"}  # answer before the model is loaded


@pytest.mark.parametrize(("api", "admin"), [(None, None), ("k", None), ("k", "a")])
def test_every_operation_declares_its_body_its_errors_and_its_auth(
    api: str | None, admin: str | None, never_loaded: Any
) -> None:
    limits = Limits(max_prompts=7, max_n=3)
    app = create_app(never_loaded, api, on_fatal=lambda: None, admin_key=admin, limits=limits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # duplicate operation ids, among others
        doc = app.openapi()
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    ids = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            ids.append(op["operationId"])
            responses = op["responses"]
            assert "200" in responses, (method, path)
            if method in ("post", "put") and (method, path) not in NO_BODY:
                body = op["requestBody"]["content"]["application/json"]["schema"]
                assert body.get("type") == "object", (method, path)
                assert {"400", "413"} <= set(responses), (method, path)
            if path not in NO_MODEL:
                assert "503" in responses, (method, path)
            guarded = bool(op["security"])
            assert guarded == ("401" in responses), (method, path)
            assert guarded == (bool(api or admin) and not path.startswith(("/health", "/ready", "/metrics")))
            for answer in responses.values():
                for media in answer.get("content", {}).values():
                    jsonschema.Draft202012Validator.check_schema(media["schema"])
    assert len(ids) == len(set(ids))
    generate = doc["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert generate["properties"]["input_ids"]["anyOf"][2]["maxItems"] == 7
    params = generate["properties"]["sampling_params"]["anyOf"][1]
    assert params["properties"]["n"]["maximum"] == 3 and params["additionalProperties"] is False


def schema_of(doc: dict[str, Any], method: str, path: str, status: int) -> dict[str, Any]:
    return doc["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]


def test_the_engines_answers_match_its_document(tiny_model: Path) -> None:
    with running_engine(tiny_model) as url:
        doc = httpx.get(f"{url}/openapi.json").json()
        body = doc["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        token = body["properties"]["input_ids"]["anyOf"][1]["items"]
        assert token["maximum"] == 511  # the loaded model's vocabulary bounds the token ids
        requests: list[tuple[str, str, Any, int]] = [
            ("post", "/generate", {"input_ids": [[1, 2]], "sampling_params": {"max_new_tokens": 2}}, 200),
            ("post", "/generate", {"input_ids": [1, 2], "return_logprob": True}, 200),
            ("post", "/generate", {"input_ids": [[1, 2]], "sampling_params": {"n": 10**6}}, 400),
            ("post", "/generate", {"text": "x", "input_ids": [1]}, 400),
            ("get", "/model_info", None, 200),
            ("get", "/server_info", None, 200),
            ("post", "/update_weights_from_disk", {"model_path": "/nowhere"}, 404),
            ("post", "/update_weights_from_disk", {"model_path": 5}, 400),
            ("post", "/pause_generation", {"mode": "sideways"}, 400),
            ("post", "/abort_request", {"rid": 5}, 400),
            ("post", "/end_weight_update", {}, 409),
            ("post", "/begin_weight_update", {"selector": "all"}, 200),
            ("post", "/end_weight_update", {}, 200),
            ("post", "/destroy_weights_update_group", {"group_name": "none"}, 404),
            ("post", "/init_weights_update_group", {"master_address": "x", "master_port": 1, "rank_offset": 0}, 400),
        ]
        for method, path, payload, status in requests:
            resp = httpx.request(method.upper(), url + path, json=payload, timeout=60)
            assert resp.status_code == status, (path, payload, resp.text)
            jsonschema.validate(resp.json(), schema_of(doc, method, path, status))
            if status == 200 and method == "post":
                jsonschema.validate(
                    payload, doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
                )
