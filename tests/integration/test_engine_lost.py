"""A /generate whose client went away is stopped on the engine.

The engine runs in this process (a real runtime behind uvicorn, over real HTTP) so a test
can set how often it checks for a client that went away.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from services.common.engine_client import EngineClient, SamplingParams
from services.common.redis_server import free_port
from services.engine import server as engine_server
from services.engine.runtime import EngineRuntime
from services.engine.server import create_app
from tests.integration.test_engine import PROMPTS, wait_running

# Long enough that no copy can finish on its own during a test (several seconds per copy).
LONG = SamplingParams(n=2, max_new_tokens=3000, ignore_eos=True, temperature=1.0, sampling_seed=0)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[str]:
    server = uvicorn.Server(
        uvicorn.Config(create_app(EngineRuntime(str(tiny_model))), port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


async def metrics(url: str) -> dict[str, float]:
    """The engine's Prometheus samples, by name with labels (``name{label="v"}``)."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics")).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def wait_idle(url: str, settled: dict[str, float], within_s: float = 30) -> dict[str, float]:
    """The metrics once nothing is decoding or queued and ``settled`` holds (name -> at least)."""
    deadline = time.monotonic() + within_s
    while True:
        now = await metrics(url)
        idle = now["pope_engine_running_sequences"] == 0 and now["pope_engine_queue_depth"] == 0
        if idle and all(now.get(k, 0.0) >= v for k, v in settled.items()):
            return now
        assert time.monotonic() < deadline, f"engine still busy: {now}"
        await asyncio.sleep(0.05)


async def test_the_engine_stops_a_generate_whose_client_went_away(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_server, "DISCONNECT_POLL_S", 0.05)
    before = await metrics(engine)
    gone = 'pope_engine_requests_total{outcome="client_gone"}'
    async with EngineClient(engine) as client:
        task = asyncio.create_task(client.generate([PROMPTS[0]], LONG, rid="cancelled-1"))
        await wait_running(engine)
        task.cancel()  # as a step's TaskGroup cancels its other groups when one fails
        with pytest.raises(asyncio.CancelledError):
            await task
    after = await wait_idle(engine, {gone: before.get(gone, 0.0) + 1}, within_s=10)
    assert after["pope_engine_aborted_sequences_total"] == before["pope_engine_aborted_sequences_total"]
    assert after["pope_engine_generation_tokens_total"] - before["pope_engine_generation_tokens_total"] < 2 * 3000
