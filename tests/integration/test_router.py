"""Many engines behind SGLang's own router (sglang-router, the pinned release, run here on
the CPU): what the router takes and does, and the trainer's fleet keeping every engine on
its weights, the router's workers and the engine registry in line with them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from services.common.engine_client import EngineClient, SamplingParams
from services.common.engines import EngineState, Registry
from services.common.keys import Keys
from services.common.messages import Lineage
from services.common.redis_server import free_port
from services.common.router_client import RouterClient, RouterError
from services.rollout.engines import Engines
from services.rollout.settings import RolloutSettings
from services.router import ADMIN_KEY_ENV, router_command
from services.trainer.fleet import UNPAUSED, Fleet
from services.trainer.settings import TrainerSettings
from tests.conftest import _wait_healthy, running_pope


@pytest.fixture
def router() -> Iterator[str]:
    with running_pope(["router", "--prometheus-port", str(free_port())], "/liveness") as proc:
        yield proc.url


@contextlib.contextmanager
def engine_on(model: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`pope engine` on ``port`` (deterministic inference), killed with SIGKILL at the end
    if it still runs: a test can kill it itself and start another on the same port."""
    pope = str(Path(sys.executable).parent / "pope")
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [pope, "engine", "--model", str(model), "--port", str(port), "--enable-deterministic-inference"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
        try:
            _wait_healthy(proc, f"http://127.0.0.1:{port}/health", log)
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(20)


def generated(url: str) -> float:
    ok = 'pope_engine_requests_total{outcome="ok"}'
    lines = [line for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines() if line.startswith(ok)]
    return float(lines[0].split()[-1]) if lines else 0.0


async def test_the_router_takes_rows_apart_and_lists_adds_and_removes_workers(tiny_model: Path, router: str) -> None:
    ports = [free_port(), free_port()]
    with engine_on(tiny_model, ports[0]), engine_on(tiny_model, ports[1]):
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        async with RouterClient(router) as r:
            assert await r.workers() == {}
            for url in urls:
                await r.add(url)
            assert set(await r.workers()) == set(urls)

            params = SamplingParams(n=4, max_new_tokens=6, temperature=1.0, sampling_seed=11)
            async with EngineClient(router, rows_apart=True) as through, EngineClient(urls[0]) as direct:
                routed = await through.generate([[1, 2, 3]], params, rid="g1")
                alone = await direct.generate([[1, 2, 3]], params, rid="g2")
                # Each row kept its own seed through the router: the same samples as one batch
                # to one engine (same weights), and G distinct ones.
                assert [o.output_ids for o in routed] == [o.output_ids for o in alone]
                assert len({tuple(o.output_ids) for o in routed}) > 1
                assert [o.meta_info.id for o in routed] == [f"g1-{k}" for k in range(4)]
            # The batch form (a list of sampling_params, a list of rids) does not pass the
            # router: hence rows apart.
            batch = EngineClient.generate_payload([[1, 2, 3]], params, rid="g3")
            async with httpx.AsyncClient(timeout=30) as plain:
                refused = await plain.post(f"{router}/generate", json=batch)
            assert refused.status_code >= 400 and "sampling_params" in refused.text
            # Round robin: both engines decoded some of the rows.
            assert all(generated(u) > 0 for u in urls)

            await r.remove(urls[1])
            assert set(await r.workers()) == {urls[0]}
            await r.remove(urls[1])  # not a worker: nothing to do


async def test_the_routers_worker_list_needs_its_admin_key_when_it_has_one(tiny_model: Path) -> None:
    """``pope router`` with POPE_ROUTER_ADMIN_KEY: its worker list is the trainer's alone
    (the router's control-plane key), while generation and health stay open."""
    args = ["router", "--prometheus-port", str(free_port())]
    with running_pope(args, "/liveness", env={ADMIN_KEY_ENV: "k3y"}) as proc:
        async with RouterClient(proc.url, retries=0) as anyone:
            with pytest.raises(RouterError) as refused:
                await anyone.workers()
            assert refused.value.status == 401
            with pytest.raises(RouterError):
                await anyone.add("http://127.0.0.1:9")
        async with RouterClient(proc.url, retries=0, admin_key="wrong") as wrong:
            with pytest.raises(RouterError):
                await wrong.workers()
        port = free_port()
        with engine_on(tiny_model, port):
            url = f"http://127.0.0.1:{port}"
            async with RouterClient(proc.url, admin_key="k3y") as trainer:
                assert await trainer.workers() == {}
                await trainer.add(url)
                assert set(await trainer.workers()) == {url}
            async with EngineClient(proc.url, rows_apart=True) as rollout:  # needs no key
                [out] = await rollout.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2), rid="g")
                assert len(out.output_ids) == 2
    with pytest.raises(ValueError, match="without ':'"):
        router_command("127.0.0.1", 1, 2, admin_key="a:b")


class Recorded(RouterClient):
    """The real router, with the fleet's calls to it noted."""

    calls: list[tuple[str, str]]

    async def add(self, url: str, api_key: str | None = None, within_s: float = 10.0) -> None:
        self.calls.append(("add", url))
        await super().add(url, api_key, within_s)

    async def remove(self, url: str, within_s: float = 10.0) -> None:
        self.calls.append(("remove", url))
        await super().remove(url, within_s)


async def test_the_fleet_keeps_every_engine_on_the_trainers_weights_and_routes_only_those(
    tiny_model: Path, router: str, aredis: Redis, keys: Keys
) -> None:
    ports = [free_port(), free_port()]
    a, b = (f"http://127.0.0.1:{p}" for p in ports)
    settings = TrainerSettings(
        engine_url=a, engine_urls=[b], router_url=router, key_prefix=keys.prefix, max_staleness=1, engine_dead_after=2
    )
    registry = Registry(aredis, keys)
    rollout = Engines(RolloutSettings(engine_url=router, engine_router=True, key_prefix=keys.prefix), aredis)
    calls: list[tuple[str, str]] = []
    recorded = Recorded(router)
    recorded.calls = calls
    fleet = Fleet(settings, aredis, router=recorded)

    async def states() -> dict[str, tuple[EngineState, str | None, bool]]:
        return {r.url: (r.state, r.weight_version, r.routed) for r in await registry.all()}

    try:
        with engine_on(tiny_model, ports[0]), engine_on(tiny_model, ports[1]) as second:
            # Both serve the start-up weights, the trainer's at v0: both join the router.
            assert await fleet.reconcile(None, 0, Lineage())
            assert await states() == {a: ("serving", "0", True), b: ("serving", "0", True)}
            assert set(await recorded.workers()) == {a, b}

            # A step: every engine loads it.
            assert await fleet.push(tiny_model, 2)
            assert await states() == {a: ("serving", "2", True), b: ("serving", "2", True)}
            assert fleet.in_use == {tiny_model}
            assert await rollout.served_version(Lineage()) == (2, 0)

            # b restarts (it serves its start-up weights, v0, past max_staleness): it leaves
            # the router, is loaded, and joins again on v2.
            async with EngineClient(b) as direct:
                await direct.update_weights_from_disk(str(tiny_model), 0)
            calls.clear()
            assert await fleet.reconcile(tiny_model, 2, Lineage())
            assert calls == [("remove", b), ("add", b)]
            assert await states() == {a: ("serving", "2", True), b: ("serving", "2", True)}

            # b dies: one missed check leaves it as it was, the second makes it dead and out
            # of the router; the rollout's versions then come from a alone.
            second.send_signal(signal.SIGKILL)
            second.wait(20)
            assert not await fleet.reconcile(tiny_model, 2, Lineage())
            assert (await states())[b][0] == "serving"
            await fleet.reconcile(tiny_model, 2, Lineage())
            after = await states()
            assert after[b][0] == "dead" and not after[b][2] and set(await recorded.workers()) == {a}
            assert await rollout.served_version(Lineage()) == (2, 0)
            # A push goes to the living (a dead engine is checked again at the next pass).
            assert await fleet.push(tiny_model, 3)
            assert (await states())[a] == ("serving", "3", True)

        # b comes back on its port with its start-up weights: it is loaded before it joins.
        with engine_on(tiny_model, ports[0]), engine_on(tiny_model, ports[1]):
            calls.clear()
            assert await fleet.reconcile(tiny_model, 3, Lineage())
            assert await states() == {a: ("serving", "3", True), b: ("serving", "3", True)}
            assert ("add", b) in calls and ("add", a) in calls  # a restarted too, at v0: out, loaded, back
            assert set(await recorded.workers()) == {a, b}
            async with EngineClient(b) as direct:
                assert (await direct.model_info()).weight_version == "3"
    finally:
        await fleet.aclose()
        await rollout.aclose()


async def test_the_fleet_undoes_an_outsiders_pause_and_foreign_weights(
    tiny_model: Path, aredis: Redis, keys: Keys
) -> None:
    """Someone else pauses the engine (an empty POST /pause_generation stalled training while
    /health_generate said 200) and loads weights named "abc" (any string, as SGLang takes):
    the fleet's next check continues it and loads the trainer's weights again."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fleet = Fleet(TrainerSettings(engine_url=url, key_prefix=keys.prefix), aredis)
    try:
        with engine_on(tiny_model, port):
            assert await fleet.push(tiny_model, 4)
            async with httpx.AsyncClient(base_url=url, timeout=30) as outsider:
                assert (await outsider.post("/pause_generation")).status_code == 200
                body = {"model_path": str(tiny_model), "weight_version": "abc"}
                assert (await outsider.post("/update_weights_from_disk", json=body)).status_code == 200
                assert (await outsider.get("/ready")).status_code == 503
                assert (await outsider.get("/health_generate")).status_code == 200  # it says nothing

                before = UNPAUSED._value.get()
                assert await fleet.reconcile(tiny_model, 4, Lineage())
                assert UNPAUSED._value.get() == before + 1
                assert (await outsider.get("/ready")).status_code == 200
                assert (await outsider.get("/model_info")).json()["weight_version"] == "4"
                [record] = await Registry(aredis, keys).all()
                assert (record.state, record.weight_version) == (EngineState.SERVING, "4")
            async with EngineClient(url) as client:  # and it generates again
                [out] = await client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))
                assert len(out.output_ids) == 2
    finally:
        await fleet.aclose()
