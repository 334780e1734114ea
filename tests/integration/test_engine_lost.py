"""A /generate whose answer is lost is stopped on the engine and never sent twice.

The engine runs in this process (a real runtime behind uvicorn, over real HTTP) so a test
can set how often it checks for a client that went away: the first test turns that check
off to see the client's own abort by rid do the stopping; the second sees the check stop a
request whose caller was cancelled.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from services.common.engine_client import EngineClient, EngineError, SamplingParams
from services.common.redis_server import free_port
from services.engine import server as engine_server
from services.engine.runtime import EngineRuntime
from services.engine.server import create_app
from tests.integration.test_engine import PROMPTS, wait_running

# Long enough that no copy can finish on its own during a test (several seconds per copy).
LONG = SamplingParams(n=2, max_new_tokens=3000, ignore_eos=True, temperature=1.0, sampling_seed=0)


@dataclass(frozen=True)
class Engine:
    url: str
    api_key: str | None

    def client(self, **kw: Any) -> EngineClient:
        return EngineClient(self.url, api_key=self.api_key, **kw)


# With an API key the auth middleware sits between the client and /generate: it must not
# hide the client's disconnect from the route.
@pytest.fixture(scope="module", params=[None, "secret"], ids=["no-key", "api-key"])
def engine(tiny_model: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    app = create_app(EngineRuntime(str(tiny_model)), api_key=request.param)
    server = uvicorn.Server(uvicorn.Config(app, port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        yield Engine(f"http://127.0.0.1:{server.config.port}", request.param)
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
        busy = {k: v for k, v in now.items() if k.startswith("pope_engine_") and "_created" not in k}
        assert time.monotonic() < deadline, f"engine still busy: {busy}"
        await asyncio.sleep(0.05)


async def test_a_generate_whose_read_times_out_is_aborted_by_rid_and_not_sent_again(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_server, "DISCONNECT_POLL_S", 3600.0)  # only the client's abort can stop it
    before = await metrics(engine.url)
    ok = 'pope_engine_requests_total{outcome="ok"}'
    async with engine.client(timeout=1.0, retries=3, backoff=0.01) as client:
        with pytest.raises(EngineError, match="not sent again"):
            await client.generate([PROMPTS[0]], LONG, rid="lost-1")
    after = await wait_idle(engine.url, {ok: before.get(ok, 0.0) + 1})

    # Both copies of the one prompt were stopped by their rids (one row each)...
    assert after["pope_engine_aborted_sequences_total"] - before["pope_engine_aborted_sequences_total"] == 2
    # ...well before their 3000 tokens, and the request was decoded once: no re-sent copy
    # ran before, beside or after it (the engine is idle and counted one request).
    assert after["pope_engine_generation_tokens_total"] - before["pope_engine_generation_tokens_total"] < 2 * 3000
    assert after[ok] - before.get(ok, 0.0) == 1


async def test_the_engine_stops_a_generate_whose_client_went_away(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_server, "DISCONNECT_POLL_S", 0.05)
    before = await metrics(engine.url)
    gone = 'pope_engine_requests_total{outcome="client_gone"}'
    if engine.api_key:  # the middleware still guards /generate
        async with httpx.AsyncClient() as http:
            assert (await http.post(f"{engine.url}/generate", json={"input_ids": [1]})).status_code == 401
    async with engine.client() as client:
        task = asyncio.create_task(client.generate([PROMPTS[0]], LONG, rid="cancelled-1"))
        await wait_running(engine.url)
        task.cancel()  # as a step's TaskGroup cancels its other groups when one fails
        with pytest.raises(asyncio.CancelledError):
            await task
    after = await wait_idle(engine.url, {gone: before.get(gone, 0.0) + 1}, within_s=10)
    assert after["pope_engine_aborted_sequences_total"] == before["pope_engine_aborted_sequences_total"]
    assert after["pope_engine_generation_tokens_total"] - before["pope_engine_generation_tokens_total"] < 2 * 3000


async def test_a_client_killed_while_sending_its_body_is_no_engine_error(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The rollout service killed mid-request (seen in the chaos run): the engine got half a
    body, then the connection closed. That is a client gone (counted), not an exception."""
    gone = 'pope_engine_requests_total{outcome="client_gone"}'
    before = (await metrics(engine.url)).get(gone, 0.0)
    port = int(engine.url.rsplit(":", 1)[1])
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {engine.api_key}\r\n" if engine.api_key else ""
    writer.write(
        f"POST /generate HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
        'Content-Length: 1000\r\n\r\n{"input_ids": [1, 2'.encode()
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await wait_idle(engine.url, {gone: before + 1})
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_the_abort_body_follows_sglangs_contract(sglang_api: Any) -> None:
    decoded = sglang_api.AbortRequest.from_json_value(EngineClient.abort_payload("g-1"))
    assert (decoded.rid, decoded.abort_all) == ("g-1", False)
