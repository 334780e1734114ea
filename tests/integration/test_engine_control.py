"""Engine control over HTTP: weight updates, pause/continue, and 503 while starting."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from transformers import AutoModelForCausalLM

from services.common.engine_client import EngineClient, EngineError, SamplingParams
from services.common.redis_server import free_port
from services.engine.runtime import EngineRuntime
from services.engine.server import create_app
from services.engine.tiny_model import TinyModelSpec, build_tiny_model
from tests.conftest import running_engine
from tests.integration.test_engine import PROMPTS, sampled_logprob_gap, wait_running

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[str]:
    with running_engine(tiny_model) as url:  # its own: these tests change the weights
        yield url


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("other"), TinyModelSpec(seed=1))


async def test_weight_update_changes_outputs_and_reports_the_version(
    engine: str, tiny_model: Path, other_weights: Path, tmp_path: Path
) -> None:
    async with EngineClient(engine) as client:
        before = await client.generate(PROMPTS, GREEDY)
        assert {o.weight_version for o in before} == {0}

        # A bad path is refused (404) and the old weights keep serving.
        with pytest.raises(EngineError, match="no HF model directory"):
            await client.update_weights_from_disk(str(tmp_path / "missing"), 1)
        assert [o.output_ids for o in await client.generate(PROMPTS, GREEDY)] == [o.output_ids for o in before]
        assert await client.weight_version() == 0

        message = await client.update_weights_from_disk(str(other_weights), 1)
        assert "Weight version updated to 1" in message
        after = await client.generate(PROMPTS, GREEDY)
        assert {o.weight_version for o in after} == {1} and await client.weight_version() == 1
        assert [o.output_ids for o in after] != [o.output_ids for o in before]
        # The trainer's side of the seam after a push: the new weights' own logprobs, not a
        # mix of old and new tensors (tied embeddings included).
        pushed = AutoModelForCausalLM.from_pretrained(str(other_weights)).eval()
        assert await sampled_logprob_gap(engine, pushed) < 1e-4

        await client.update_weights_from_disk(str(tiny_model), 2)  # back to the first weights
        again = await client.generate(PROMPTS, GREEDY)
    assert [o.output_ids for o in again] == [o.output_ids for o in before]
    assert {o.weight_version for o in again} == {2}


async def test_in_flight_requests_finish_on_the_weights_they_started_with(engine: str, other_weights: Path) -> None:
    async with EngineClient(engine) as client:
        start = await client.weight_version()
        long = SamplingParams(max_new_tokens=400, ignore_eos=True, temperature=1.0, sampling_seed=0)
        task = asyncio.create_task(client.generate([PROMPTS[0]], long))
        await wait_running(engine)
        await client.update_weights_from_disk(str(other_weights), start + 1)  # waits for the batch
        [out] = await task
        assert out.finish_reason == "length" and len(out.output_ids) == 400
        assert out.weight_version == start
        [later] = await client.generate([PROMPTS[0]], GREEDY)
        assert later.weight_version == start + 1

        # With abort_all_requests the batch in flight is aborted instead.
        task = asyncio.create_task(client.generate([PROMPTS[0]], long.model_copy(update={"max_new_tokens": 3000})))
        await wait_running(engine)
        await client.update_weights_from_disk(str(other_weights), start + 2, abort_all_requests=True)
        [aborted] = await task
    assert aborted.finish_reason == "abort"


async def test_pause_in_place_holds_generation_until_continue(engine: str) -> None:
    async with EngineClient(engine) as client:
        await client.pause("in_place")
        task = asyncio.create_task(client.generate([PROMPTS[0]], GREEDY))
        done, _ = await asyncio.wait([task], timeout=0.5)
        assert not done, "generation ran while paused"
        await client.resume()
        [out] = await asyncio.wait_for(task, 30)
    assert out.finish_reason in ("length", "stop") and out.output_ids


def test_health_is_503_while_the_model_loads(tiny_model: Path) -> None:
    release = threading.Event()

    def slow_load() -> EngineRuntime:
        release.wait(30)
        return EngineRuntime(str(tiny_model))

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(slow_load), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        while not server.started:
            time.sleep(0.01)
        assert httpx.get(f"{url}/health").status_code == 503
        resp = httpx.post(f"{url}/generate", json={"input_ids": [1]})
        assert resp.status_code == 503 and "loading the model" in resp.json()["message"]
        release.set()
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(f"{url}/health_generate").status_code == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)
