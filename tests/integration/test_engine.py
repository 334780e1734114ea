"""The CPU engine over real HTTP: SGLang's contract, and that what it computes is right.

Every request the client sends must decode with SGLang's GenerateRequest and every
response with GenerateResponse (their own contract module, fetched at test time); and
the numbers must be right: logprobs equal a plain forward pass, greedy equals
transformers' generate, seeds count as on SGLang (only under deterministic inference, and
then shared by a request's n copies), stops and lengths finish as they should.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from services.common.engine_client import EngineClient, EngineError, SamplingParams

PROMPTS = [[1, 87, 85, 261], [1, 87, 85, 261, 201, 309, 273, 13, 20, 16, 2, 201], [40, 41]]


@pytest.fixture(scope="module")
def hf_model(tiny_model: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()


def post(url: str, body: Any) -> httpx.Response:
    return httpx.post(f"{url}/generate", json=body, timeout=60)


def check_contract(api: Any, request: dict[str, Any], response: Any) -> None:
    """The request decodes as SGLang's GenerateRequest; each response row as GenerateResponse,
    with the fields this system relies on present and well-formed."""
    req = api.GenerateRequest.from_json_value(request)
    assert req.input_ids is not None or req.text is not None
    params = request.get("sampling_params") or {}
    for one in params if isinstance(params, list) else [params]:
        api.SamplingParams.from_json_value(one)
    rows = response if isinstance(response, list) else [response]
    for row in rows:
        decoded = api.GenerateResponse.from_json_value(row)
        meta = decoded.meta_info
        assert meta is not None and meta.id and isinstance(row["output_ids"], list)
        assert meta.completion_tokens == len(row["output_ids"]) and meta.prompt_tokens > 0
        assert isinstance(meta.weight_version, str) and meta.weight_version.isdigit()
        assert isinstance(meta.e2e_latency, float)
        fr = row["meta_info"]["finish_reason"]
        shape = {"stop": api.FinishStop, "length": api.FinishLength, "abort": api.FinishAbort}[fr["type"]]
        shape.from_json_value(fr)
        if request.get("return_logprob"):
            entries = row["meta_info"]["output_token_logprobs"]
            assert len(entries) == len(row["output_ids"])
            for entry, tok in zip(entries, row["output_ids"], strict=True):
                parsed = api.LogprobEntry.from_json_value(entry)
                assert parsed.token_id == tok and parsed.logprob <= 0


def test_requests_and_responses_follow_sglangs_contract(engine_url: str, sglang_api: Any) -> None:
    cases = [
        EngineClient.generate_payload([PROMPTS[0]], SamplingParams(max_new_tokens=5, temperature=0.8)),
        EngineClient.generate_payload(PROMPTS, SamplingParams(max_new_tokens=6, n=3, sampling_seed=3), rid="grp"),
        EngineClient.generate_payload([PROMPTS[1]], SamplingParams(max_new_tokens=4, top_k=1, stop_token_ids=[5])),
        {"text": "Compute 2+2.", "sampling_params": {"max_new_tokens": 3, "temperature": 0}},
    ]
    for body in cases:
        resp = post(engine_url, body)
        assert resp.status_code == 200, resp.text
        check_contract(sglang_api, body, resp.json())
    info = httpx.get(f"{engine_url}/model_info").json()
    decoded = sglang_api.GetModelInfoResponse.from_json_value(info)
    assert decoded.is_generation and decoded.weight_version == "0" and decoded.model_path


def test_batch_and_n_are_ordered_by_prompt(engine_url: str) -> None:
    body = EngineClient.generate_payload(PROMPTS, SamplingParams(max_new_tokens=3, n=2, sampling_seed=1))
    assert body["input_ids"] == [p for p in PROMPTS for _ in range(2)]  # the client's rows: copies of a prompt
    assert [p["sampling_seed"] for p in body["sampling_params"]] == [1, 2] * len(PROMPTS)
    rows = post(engine_url, body).json()
    assert [r["meta_info"]["prompt_tokens"] for r in rows] == [len(p) for p in PROMPTS for _ in range(2)]
    sglang_n = post(engine_url, {"input_ids": PROMPTS, "sampling_params": {"max_new_tokens": 3, "n": 2}}).json()
    assert [r["meta_info"]["prompt_tokens"] for r in sglang_n] == [len(p) for p in PROMPTS for _ in range(2)]
    single = post(engine_url, {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 2}}).json()
    assert isinstance(single, dict)


async def sampled_logprob_gap(engine_url: str, hf_model: Any, temperature: float = 0.7) -> float:
    """The largest gap between the engine's logprobs of a sampled batch and a plain forward
    pass of ``hf_model`` (log_softmax(logits / T)) on the same tokens."""
    params = SamplingParams(max_new_tokens=12, temperature=temperature, top_p=0.9, sampling_seed=11)
    async with EngineClient(engine_url) as engine:
        outs = await engine.generate(PROMPTS, params)  # a padded batch of different lengths
    worst = 0.0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = torch.tensor([prompt + out.output_ids])
        with torch.no_grad():
            logits = hf_model(ids).logits[0].float()  # [T, V]
        logp = torch.log_softmax(logits / temperature, dim=-1)
        expected = [logp[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(out.output_ids)]
        worst = max(worst, *(abs(a - b) for a, b in zip(expected, out.logprobs, strict=True)))
    return worst


async def test_logprobs_equal_a_plain_forward_pass(engine_url: str, hf_model: Any) -> None:
    worst = await sampled_logprob_gap(engine_url, hf_model)
    assert worst < 1e-4, f"engine logprobs differ from log_softmax(logits / T) by up to {worst}"


async def test_top_k_1_is_transformers_greedy(engine_url: str, hf_model: Any) -> None:
    async with EngineClient(engine_url) as engine:
        outs = await engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, top_k=1, temperature=0.8))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        eos = hf_model.generation_config.eos_token_id
        ref = hf_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=hf_model.generation_config.pad_token_id,
        )
        assert out.output_ids == ref[0, len(prompt) :].tolist()


async def test_a_short_request_finishes_while_a_long_one_runs(engine_url: str, hf_model: Any) -> None:
    """Continuous batching: a request that arrives while a 4,000-token one decodes joins the
    running batch at the next step and answers while the long one goes on, with its
    logprobs still those of a plain forward pass over its own tokens."""
    long = {"max_new_tokens": 4000, "ignore_eos": True}
    short = {"max_new_tokens": 4, "ignore_eos": True, "temperature": 0.8}
    async with httpx.AsyncClient(timeout=120) as http:
        task = asyncio.create_task(
            http.post(f"{engine_url}/generate", json={"input_ids": [5, 6, 7], "sampling_params": long, "rid": "long"})
        )
        await wait_running(engine_url)
        resp = await http.post(
            f"{engine_url}/generate",
            json={"input_ids": PROMPTS[1], "sampling_params": short, "return_logprob": True},
        )
        assert resp.status_code == 200, resp.text
        assert not task.done(), "the short request waited for the long one"
        await http.post(f"{engine_url}/abort_request", json={"rid": "long"})
        long_row = (await task).json()
    row = resp.json()
    assert row["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert long_row["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < long_row["meta_info"]["completion_tokens"] < 4000
    ids = torch.tensor([PROMPTS[1] + row["output_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(ids).logits[0].float() / 0.8, dim=-1)
    want = [logp[len(PROMPTS[1]) - 1 + i, tok].item() for i, tok in enumerate(row["output_ids"])]
    got = [lp for lp, _, _ in row["meta_info"]["output_token_logprobs"]]
    assert max(abs(a - b) for a, b in zip(want, got, strict=True)) < 1e-4


def deterministic(url: str) -> bool:
    """The mode, as SGLang's /server_info reports it."""
    return bool(httpx.get(f"{url}/server_info").json()["enable_deterministic_inference"])


def sampled(url: str, prompt: list[int], seed: int | None, n: int = 1) -> list[tuple[int, ...]]:
    """One raw /generate of ``prompt`` (SGLang's own ``n``, one seed): each copy's tokens."""
    params: dict[str, Any] = {"max_new_tokens": 32, "temperature": 1.0, "ignore_eos": True, "n": n}
    if seed is not None:
        params["sampling_seed"] = seed
    resp = post(url, {"input_ids": prompt, "sampling_params": params})
    assert resp.status_code == 200, resp.text
    rows = resp.json()
    return [tuple(r["output_ids"]) for r in (rows if isinstance(rows, list) else [rows])]


async def test_with_deterministic_inference_a_seed_reproduces_and_n_copies_share_it(engine_url: str) -> None:
    """As SGLang under --enable-deterministic-inference: a seed reproduces a sample, the n
    copies of one request share the seed (one sample n times: no GRPO signal), and a request
    without a seed samples with 42. The client's rows seeded seed + j differ and reproduce."""
    assert deterministic(engine_url)
    copies = sampled(engine_url, PROMPTS[0], 123, n=4)
    assert len(copies) == 4 and len(set(copies)) == 1, "SGLang's n copies of one seeded request are one sample"
    assert sampled(engine_url, PROMPTS[0], 123) == copies[:1]
    assert sampled(engine_url, PROMPTS[0], None, n=2) == sampled(engine_url, PROMPTS[0], 42) * 2

    params = SamplingParams(max_new_tokens=32, temperature=1.0, ignore_eos=True, n=4, sampling_seed=123)
    async with EngineClient(engine_url) as engine:
        a = [tuple(o.output_ids) for o in await engine.generate([PROMPTS[0]], params)]
        b = [tuple(o.output_ids) for o in await engine.generate([PROMPTS[0]], params)]
        unseeded = await engine.generate([PROMPTS[0]], params.model_copy(update={"sampling_seed": None}))
    assert a == b and len(set(a)) == 4, "the client's copies are rows seeded 123 + j"
    assert a[0] == copies[0] and a[2] == sampled(engine_url, PROMPTS[0], 125)[0]
    assert len({tuple(o.output_ids) for o in unseeded}) == 4  # the client draws a seed: not 42 for all


async def test_without_deterministic_inference_the_seed_is_ignored(default_engine_url: str) -> None:
    """SGLang's default: sampling_seed does not count, so two requests with one seed differ
    (32 tokens of a 512-token vocabulary at temperature 1: equal by chance with probability
    far below 1e-30), and so do the n copies of one request and the client's rows."""
    assert not deterministic(default_engine_url)
    assert sampled(default_engine_url, PROMPTS[0], 123) != sampled(default_engine_url, PROMPTS[0], 123)
    assert len(set(sampled(default_engine_url, PROMPTS[0], 123, n=4))) == 4
    params = SamplingParams(max_new_tokens=32, temperature=1.0, ignore_eos=True, n=4, sampling_seed=123)
    async with EngineClient(default_engine_url) as engine:
        outs = await engine.generate([PROMPTS[0]], params)
    assert len({tuple(o.output_ids) for o in outs}) == 4


async def test_stop_tokens_and_length_limits(engine_url: str) -> None:
    async with EngineClient(engine_url) as engine:
        [free] = await engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=8, temperature=0))
        assert free.finish_reason == "length" and len(free.output_ids) == 8
        assert free.meta_info.finish_reason is not None and free.meta_info.finish_reason.length == 8
        stop_at = free.output_ids[3]
        first = free.output_ids.index(stop_at)
        [stopped] = await engine.generate(
            [PROMPTS[1]], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[stop_at])
        )
    assert stopped.finish_reason == "stop" and stopped.meta_info.finish_reason.matched == stop_at  # type: ignore[union-attr]
    assert stopped.output_ids == free.output_ids[: first + 1]  # the stop token is the last output id


def test_bad_requests_answer_400_with_the_reason(engine_url: str) -> None:
    cases = {
        "unknown sampling parameter 'temprature'": {"input_ids": [1], "sampling_params": {"temprature": 1}},
        "'regex' is not supported": {"input_ids": [1], "sampling_params": {"regex": "a+"}},
        "outside [0,": {"input_ids": [10**6]},
        "exactly one of": {"sampling_params": {}},
        "top_p must be in": {"input_ids": [1], "sampling_params": {"top_p": 0}},
        "streaming is not supported": {"input_ids": [1], "stream": True},
    }
    for reason, body in cases.items():
        resp = post(engine_url, body)
        assert resp.status_code == 400 and reason in resp.json()["message"], (reason, resp.text)
    resp = httpx.post(f"{engine_url}/generate", content=b"{not json", timeout=10)
    assert resp.status_code == 400


async def test_abort_request_finishes_with_abort(engine_url: str) -> None:
    async with EngineClient(engine_url) as engine:
        task = asyncio.create_task(
            engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3000, ignore_eos=True), rid="long")
        )
        await wait_running(engine_url)
        await engine.abort("long-0")  # the client names row k of a request "<rid>-<k>"
        [out] = await asyncio.wait_for(task, 30)
    assert out.finish_reason == "abort" and 0 < len(out.output_ids) < 3000


async def test_rids_are_named_and_matched_as_sglang_names_and_matches_them(engine_url: str) -> None:
    """SGLang 0.5.23 keeps a batch's list of rids, names the prompts of a batch sent one
    string ``r_i``, gives the n > 1 copies of a prompt fresh ids, refuses a rid twice in one
    batch; an abort by a rid no request has stops nothing, one by a rid it has stops every
    request whose rid starts with it."""
    short = {"max_new_tokens": 2}

    def ids(body: dict[str, Any]) -> list[str]:
        resp = post(engine_url, {"input_ids": PROMPTS[:2], **body})
        assert resp.status_code == 200, resp.text
        return [r["meta_info"]["id"] for r in resp.json()]

    assert ids({"sampling_params": short, "rid": ["a", "b"]}) == ["a", "b"]
    assert ids({"sampling_params": short, "rid": "r"}) == ["r_0", "r_1"]
    copies = ids({"sampling_params": {**short, "n": 2}, "rid": ["a", "b"]})
    assert len(set(copies)) == 4 and not {"a", "b"} & set(copies)
    twice = post(engine_url, {"input_ids": PROMPTS[:2], "sampling_params": short, "rid": ["a", "a"]})
    assert twice.status_code == 400 and "Duplicate request IDs" in twice.json()["message"]

    aborted = "pope_engine_aborted_sequences_total"
    long = {"max_new_tokens": 3000, "ignore_eos": True}
    body = {"input_ids": PROMPTS[:2], "sampling_params": long, "rid": ["x-1", "x-10"], "return_logprob": False}
    async with httpx.AsyncClient(timeout=60) as http:
        task = asyncio.create_task(http.post(f"{engine_url}/generate", json=body))
        await wait_running(engine_url)
        before = metric(engine_url, aborted)
        await http.post(f"{engine_url}/abort_request", json={"rid": "x"})  # no request has rid "x"
        assert metric(engine_url, aborted) == before
        await http.post(f"{engine_url}/abort_request", json={"rid": "x-1"})  # "x-1" and "x-10"
        rows = (await asyncio.wait_for(task, 30)).json()
    assert metric(engine_url, aborted) == before + 2
    assert [r["meta_info"]["finish_reason"]["type"] for r in rows] == ["abort", "abort"]


def metric(url: str, name: str) -> float:
    line = next(x for x in httpx.get(f"{url}/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


async def wait_running(url: str, within_s: float = 30) -> None:
    """Until the engine reports a batch decoding (pope_engine_running_sequences > 0)."""
    async with httpx.AsyncClient() as http:
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            text = (await http.get(f"{url}/metrics")).text
            line = next(x for x in text.splitlines() if x.startswith("pope_engine_running_sequences "))
            if float(line.split()[1]) > 0:
                return
            assert asyncio.get_running_loop().time() < deadline, "no batch started"
            await asyncio.sleep(0.01)


async def test_client_errors_are_clear(engine_url: str) -> None:
    async with EngineClient(engine_url) as engine:
        with pytest.raises(EngineError, match="400"):
            await engine.generate([[10**6]], SamplingParams())
    async with EngineClient("http://127.0.0.1:9", retries=1, backoff=0.01) as dead:
        with pytest.raises(EngineError, match="cannot reach the engine"):
            await dead.model_info()
        assert not await dead.healthy()
    # An engine that accepts the connection and never answers: a read timeout, which must
    # surface as EngineError (callers catch only that), not as an httpx exception.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        async with EngineClient(url, timeout=0.3, retries=1, backoff=0.01) as stuck:
            with pytest.raises(EngineError, match="ReadTimeout"):
                await stuck.update_weights_from_disk("/x", 1)
