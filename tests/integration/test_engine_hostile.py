"""The CPU engine against hostile clients: the cases a security probe found, each over real
HTTP against a real engine process serving the tiny model.

Concurrent weight loads once broke the engine for good; malformed bodies answered 500;
n = 10^6 grew it past 5 GB; a huge max_new_tokens held it for minutes. Each is now a
quick 400 (or 409, 413) in SGLang's error shape, and the engine serves on.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.engine.tiny_model import TinyModelSpec, build_tiny_model
from tests.conftest import Popen, running_pope

GREEDY = {"max_new_tokens": 6, "temperature": 0}
PROMPT = [[5, 6, 7, 8]]
TOKEN_BUDGET = 3000  # under the tiny model's 4096-token context, so one capped row passes it
MAX_BYTES = 1 << 20


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[Popen]:
    """Its own engine (these tests change its weights), with small bounds to probe."""
    env = {
        "POPE_ENGINE__MAX_REQUEST_TOKENS": str(TOKEN_BUDGET),
        "POPE_ENGINE__MAX_REQUEST_BYTES": str(MAX_BYTES),
        "POPE_ENGINE__MAX_N": "8",
        "POPE_ENGINE__MAX_PROMPTS_PER_REQUEST": "16",
    }
    with running_pope(["engine", "--model", str(tiny_model), "--enable-deterministic-inference"], "/health", env) as p:
        yield p


def post(url: str, path: str, body: Any = None, content: bytes | None = None) -> httpx.Response:
    return httpx.post(url + path, json=body, content=content, timeout=60)


def greedy(url: str) -> list[int]:
    resp = post(url, "/generate", {"input_ids": PROMPT, "sampling_params": GREEDY})
    assert resp.status_code == 200, resp.text
    return list(resp.json()[0]["output_ids"])


def assert_error(resp: httpx.Response, status: int = 400, words: str = "") -> None:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    body = resp.json()
    assert body["object"] == "error" and body["code"] == status and isinstance(body["message"], str), body
    assert words in body["message"], body["message"]


def rss_kb(proc: Popen) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_concurrent_weight_loads_are_serialized_and_the_engine_serves_on(engine: Popen, tiny_model: Path) -> None:
    request = {"input_ids": PROMPT, "sampling_params": GREEDY}
    async with httpx.AsyncClient(base_url=engine.url, timeout=120) as http:
        before = (await http.post("/generate", json=request)).json()[0]["output_ids"]
        loads = [
            http.post("/update_weights_from_disk", json={"model_path": str(tiny_model), "weight_version": f"v{i}"})
            for i in range(4)
        ]
        answers = await asyncio.gather(*loads)
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
        assert all(a.json()["success"] for a in answers)
        version = (await http.get("/model_info")).json()["weight_version"]
        assert version in {f"v{i}" for i in range(4)}
        after = (await http.post("/generate", json=request)).json()[0]["output_ids"]
        assert after == before  # the same weights, loaded whole
        again = await http.post(
            "/update_weights_from_disk", json={"model_path": str(tiny_model), "weight_version": "0"}
        )
        assert again.status_code == 200 and again.json()["success"], again.text


def test_failed_loads_leave_the_old_weights_serving(engine: Popen, tiny_model: Path, tmp_path: Path) -> None:
    before = greedy(engine.url)
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    wider = build_tiny_model(tmp_path / "wider", TinyModelSpec(hidden_size=32, intermediate_size=64))
    for path, status in ((tmp_path / "missing", 404), ("bad\x00path", 404), (truncated, 400), (wider, 400)):
        resp = post(engine.url, "/update_weights_from_disk", {"model_path": str(path), "weight_version": "bad"})
        assert resp.status_code == status and resp.json()["success"] is False, (path, resp.text)
        assert httpx.get(engine.url + "/model_info").json()["weight_version"] != "bad"
        assert greedy(engine.url) == before
    good = post(engine.url, "/update_weights_from_disk", {"model_path": str(tiny_model), "weight_version": "0"})
    assert good.status_code == 200 and good.json()["success"]


def test_any_string_is_a_weight_version(engine: Popen, tiny_model: Path) -> None:
    resp = post(engine.url, "/update_weights_from_disk", {"model_path": str(tiny_model), "weight_version": "abc"})
    assert resp.status_code == 200 and "Weight version updated to abc" in resp.json()["message"]
    assert httpx.get(engine.url + "/model_info").json()["weight_version"] == "abc"
    out = post(engine.url, "/generate", {"input_ids": PROMPT, "sampling_params": GREEDY}).json()[0]
    assert out["meta_info"]["weight_version"] == "abc"
    assert httpx.get(engine.url + "/metrics").status_code == 200  # the gauge shows NaN for it
    post(engine.url, "/update_weights_from_disk", {"model_path": str(tiny_model), "weight_version": "0"})


def test_a_disk_load_while_a_distributed_update_is_open_is_409(engine: Popen, tiny_model: Path) -> None:
    assert post(engine.url, "/begin_weight_update", {}).status_code == 200
    try:
        resp = post(engine.url, "/update_weights_from_disk", {"model_path": str(tiny_model), "weight_version": "x"})
        assert_error(resp, 409, "end_weight_update")
    finally:
        assert post(engine.url, "/end_weight_update", {}).status_code == 200
    resp = post(engine.url, "/update_weights_from_disk", {"model_path": str(tiny_model), "weight_version": "0"})
    assert resp.status_code == 200


def test_ready_is_503_while_paused(engine: Popen) -> None:
    assert httpx.get(engine.url + "/ready").status_code == 200
    assert post(engine.url, "/pause_generation", {"mode": "in_place"}).status_code == 200
    try:
        assert httpx.get(engine.url + "/ready").status_code == 503
        assert httpx.get(engine.url + "/health").status_code == 200  # paused is not unhealthy
    finally:
        assert post(engine.url, "/continue_generation", {}).status_code == 200
    assert httpx.get(engine.url + "/ready").status_code == 200


def test_a_huge_n_is_refused_at_once_and_costs_no_memory(engine: Popen) -> None:
    rss = rss_kb(engine)
    start = time.monotonic()
    resp = post(engine.url, "/generate", {"input_ids": PROMPT, "sampling_params": {"n": 10**6}})
    assert_error(resp, 400, "parallel_sample_num")
    assert time.monotonic() - start < 2
    assert rss_kb(engine) < rss + 50_000  # KB: nothing was made for the million copies


def test_the_total_work_of_a_request_is_bounded(engine: Popen) -> None:
    start = time.monotonic()
    huge = {"max_new_tokens": 10**9, "ignore_eos": True}
    assert_error(post(engine.url, "/generate", {"input_ids": PROMPT, "sampling_params": huge}), 400, "tokens")
    assert time.monotonic() - start < 2
    rows = {"input_ids": PROMPT * 8, "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    assert_error(post(engine.url, "/generate", rows), 400, "at most 3000")  # 8 x 404 > 3000
    assert_error(post(engine.url, "/generate", {"input_ids": PROMPT * 17}), 400, "at most 16")
    capped = post(engine.url, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 20}})
    assert capped.status_code == 200


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"input_ids": PROMPT, "sampling_params": "greedy"}, "must be an object"),
        ({"input_ids": PROMPT, "sampling_params": 5}, "must be an object"),
        ({"input_ids": PROMPT, "sampling_params": [7]}, "must be an object"),
        ({"input_ids": PROMPT, "sampling_params": {"stop_token_ids": 5}}, "stop_token_ids"),
        ({"input_ids": PROMPT, "sampling_params": {"stop_token_ids": "abc"}}, "stop_token_ids"),
        ({"input_ids": PROMPT, "sampling_params": {"stop_token_ids": [True]}}, "stop_token_ids"),
        ({"input_ids": PROMPT, "rid": {"a": 1}}, "rid"),
        ({"input_ids": PROMPT, "sampling_params": {"sampling_seed": 2**70}}, "sampling_seed"),
        (b'{"input_ids": [[5]], "sampling_params": {"temperature": 1e400}}', "temperature"),  # inf
        (b'{"input_ids": [[5]], "sampling_params": {"temperature": -1e400}}', "temperature"),
        ({"input_ids": PROMPT, "sampling_params": {"top_k": 0}}, "top_k"),
        ({"input_ids": PROMPT, "sampling_params": {"min_new_tokens": False}}, "not supported"),
        ({"input_ids": PROMPT, "return_logprob": "yes"}, "return_logprob"),
        ({"input_ids": PROMPT, "stream": "no"}, "stream"),
    ],
)
def test_malformed_generate_bodies_answer_400(engine: Popen, body: dict[str, Any] | bytes, words: str) -> None:
    raw = isinstance(body, bytes)
    resp = post(engine.url, "/generate", None if raw else body, content=body if isinstance(body, bytes) else None)
    assert_error(resp, 400, words)


BODY_ROUTES = (
    "/generate",
    "/update_weights_from_disk",
    "/pause_generation",
    "/continue_generation",
    "/abort_request",
    "/init_weights_update_group",
    "/destroy_weights_update_group",
    "/begin_weight_update",
    "/end_weight_update",
    "/update_weights_from_distributed",
)
BAD_BODIES = {
    "deep": b"[" * 10_000 + b"]" * 10_000,
    "deep object": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "nan": b'{"input_ids": [[1]], "sampling_params": {"temperature": NaN}}',
    "infinity": b'{"x": Infinity}',
    "not utf-8": b'{"text": "\xff\xfe"}',
    "truncated": b'{"input_ids": [[1, 2',
    "not an object": b"[1, 2]",
    "a string": b'"x"',
    "digits": b'{"x": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_every_route_answers_a_malformed_body_with_400(engine: Popen, path: str) -> None:
    for name, raw in BAD_BODIES.items():
        resp = post(engine.url, path, content=raw)
        assert resp.status_code == 400, (path, name, resp.status_code, resp.text[:200])
        assert resp.json()["object"] == "error", (path, name)
    if path not in ("/pause_generation", "/continue_generation"):  # an empty body is their defaults
        assert_error(post(engine.url, path, content=b""), 400)
    assert greedy(engine.url)  # and serves on


def test_abort_with_a_rid_that_is_not_a_string_is_400(engine: Popen) -> None:
    assert_error(post(engine.url, "/abort_request", {"rid": {"a": 1}}), 400, "rid")
    assert_error(post(engine.url, "/abort_request", {"rid": [1]}), 400, "rid")
    assert post(engine.url, "/abort_request", {"rid": ["a", "b"]}).status_code == 200


def test_an_oversized_body_is_413_without_reading_it_whole(engine: Popen) -> None:
    big = b'{"text": "' + b"a" * (50 * 1024 * 1024) + b'"}'
    assert_error(post(engine.url, "/generate", content=big), 413, "max_request_bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"text": "'
        for _ in range(50):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    resp = httpx.post(engine.url + "/generate", content=chunks(), timeout=60)
    assert_error(resp, 413, "max_request_bytes")
    assert greedy(engine.url)


def test_a_tiny_temperature_samples_greedily_with_finite_logprobs(engine: Popen) -> None:
    tiny = {"input_ids": PROMPT, "return_logprob": True, "sampling_params": {**GREEDY, "temperature": 1e-300}}
    out = post(engine.url, "/generate", tiny).json()[0]
    assert out["output_ids"] == greedy(engine.url)
    assert all(isinstance(lp, float) for lp, _tok, _text in out["meta_info"]["output_token_logprobs"])
