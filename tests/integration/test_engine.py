"""The CPU engine over real HTTP: SGLang's contract, and that what it computes is right.

Every request the client sends must decode with SGLang's GenerateRequest and every
response with GenerateResponse (their own contract module, fetched at test time); and
the numbers must be right: logprobs equal a plain forward pass, greedy equals
transformers' generate, seeds reproduce, stops and lengths finish as they should.
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
    api.SamplingParams.from_json_value(request.get("sampling_params") or {})
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
    rows = post(engine_url, body).json()
    assert [r["meta_info"]["prompt_tokens"] for r in rows] == [len(p) for p in PROMPTS for _ in range(2)]
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


async def test_seeds_reproduce_and_copies_differ(engine_url: str) -> None:
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=4, sampling_seed=123)
    async with EngineClient(engine_url) as engine:
        a = await engine.generate([PROMPTS[0]], params)
        b = await engine.generate([PROMPTS[0]], params)
        third = await engine.generate([PROMPTS[0]], params.model_copy(update={"n": 1, "sampling_seed": 125}))
        unseeded = [
            await engine.generate([PROMPTS[0]], params.model_copy(update={"sampling_seed": None})) for _ in range(2)
        ]
    assert [o.output_ids for o in a] == [o.output_ids for o in b]
    assert len({tuple(o.output_ids) for o in a}) > 1, "copies with seeds seed+i must differ"
    assert third[0].output_ids == a[2].output_ids  # copy i is seeded with sampling_seed + i
    assert [o.output_ids for o in unseeded[0]] != [o.output_ids for o in unseeded[1]]


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
        await engine.abort("long")
        [out] = await asyncio.wait_for(task, 30)
    assert out.finish_reason == "abort" and 0 < len(out.output_ids) < 3000


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
