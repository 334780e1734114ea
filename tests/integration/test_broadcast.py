"""Broadcast weight sync end to end: a trainer policy in this process, two real CPU engines
(`pope engine` subprocesses), the weights over gloo in flattened buckets.

After a push both engines serve the trainer's new weights (their sampling logprobs equal
the trainer's own for the same tokens, ratio 1 within 1e-3) under the new version name;
an engine that fails mid-push is reported, the other is updated, and a failed engine that
is still up keeps serving its old weights. And from two FSDP2 ranks under torchrun
(broadcast_ranks.py) the engine serves what the same gather writes to disk.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.engine_client import EngineClient, SamplingParams
from services.trainer import broadcast, policy
from services.trainer.grpo import token_logprobs
from services.trainer.operations import Ranks
from services.trainer.settings import TrainerSettings
from services.trainer.world import World
from tests.conftest import running_pope

PROMPT = [1, 2, 3, 4, 5]


def perturb(p: policy.Policy, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in p.lm.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)


async def ratios(engine: EngineClient, p: policy.Policy) -> tuple[torch.Tensor, int]:
    """exp(lp_engine - lp_trainer) of a completion the engine samples, and its version."""
    [out] = await engine.generate([PROMPT], SamplingParams(max_new_tokens=8, temperature=1.0, sampling_seed=5))
    ids = torch.tensor([PROMPT + out.output_ids])
    with torch.no_grad():
        lp, _ = token_logprobs(p.lm, ids, None, torch.tensor([1.0]))
    ours = lp[0, len(PROMPT) - 1 :]
    return torch.exp(torch.tensor(out.logprobs) - ours), out.weight_version


@pytest.fixture
def two_engines(tiny_model: Path) -> Any:
    with (
        running_pope(["engine", "--model", str(tiny_model), "--enable-deterministic-inference"], "/health") as a,
        running_pope(["engine", "--model", str(tiny_model), "--enable-deterministic-inference"], "/health") as b,
    ):
        yield a, b


def trainer(tiny_model: Path, tmp_path: Path) -> Ranks:
    settings = TrainerSettings(model_path=str(tiny_model), checkpoint_dir=tmp_path / "ck")
    return Ranks(policy.build(settings, World(), None))


def test_both_engines_serve_the_broadcast_weights(two_engines: Any, tiny_model: Path, tmp_path: Path) -> None:
    ranks = trainer(tiny_model, tmp_path)
    perturb(ranks.policy, 1)

    async def run() -> None:
        async with EngineClient(two_engines[0].url) as a, EngineClient(two_engines[1].url) as b:
            conns = [await broadcast.connect(e, "127.0.0.1", 30.0) for e in (a, b)]
            # Small buckets: several update calls, the version on the last one only.
            errors = await broadcast.push_broadcast(conns, ranks, torch.float32, 3, 0, 64 << 10, 30.0)
            assert errors == {a.base_url: None, b.base_url: None}
            for engine in (a, b):
                ratio, version = await ratios(engine, ranks.policy)
                assert version == 3 and await engine.served_version() == (3, 0)
                assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3), ratio
            # A second push on the same groups, in a new lineage.
            perturb(ranks.policy, 2)
            errors = await broadcast.push_broadcast(conns, ranks, torch.float32, 1, 1, 512 << 20, 30.0)
            assert set(errors.values()) == {None}
            ratio, _ = await ratios(b, ranks.policy)
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3) and await b.served_version() == (1, 1)
            for conn in conns:
                await conn.close()

    asyncio.run(run())


def test_a_failed_engine_is_reported_and_the_other_is_updated(
    two_engines: Any, tiny_model: Path, tmp_path: Path
) -> None:
    ranks = trainer(tiny_model, tmp_path)
    proc_a, proc_b = two_engines

    async def run() -> None:
        async with EngineClient(proc_a.url) as a, EngineClient(proc_b.url) as b:
            before, _ = await ratios(a, ranks.policy)  # the start-up weights, on both sides
            conns = [await broadcast.connect(e, "127.0.0.1", 10.0) for e in (a, b)]
            perturb(ranks.policy, 1)
            # Engine a loses its group behind the trainer's back: its update call is refused.
            await a.destroy_weights_update_group(conns[0].group_name)
            errors = await broadcast.push_broadcast(conns, ranks, torch.float32, 1, 0, 64 << 10, 10.0)
            assert isinstance(errors[a.base_url], broadcast.BroadcastError) and errors[b.base_url] is None
            assert await a.served_version() == (0, 0) and await b.served_version() == (1, 0)
            with torch.no_grad():  # a still serves the start-up weights
                again = policy.build(ranks.policy.settings, World(), None)
            ratio, _ = await ratios(a, again)
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3) and before.numel() > 0
            ratio, _ = await ratios(b, ranks.policy)
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3)

            # Engine b killed in the middle of a push (at its second bucket): reported, and a,
            # connected anew, is updated.
            fresh = await broadcast.connect(a, "127.0.0.1", 10.0)
            perturb(ranks.policy, 2)
            calls = 0
            original = b.update_weights_from_distributed

            async def killed_at_second(body: dict[str, Any], *, timeout_s: float) -> str:
                nonlocal calls
                calls += 1
                if calls == 2:
                    proc_b.send_signal(signal.SIGKILL)
                    proc_b.wait(10)
                return await original(body, timeout_s=timeout_s)

            b.update_weights_from_distributed = killed_at_second  # type: ignore[method-assign,assignment]
            errors = await broadcast.push_broadcast([conns[1], fresh], ranks, torch.float32, 2, 0, 64 << 10, 10.0)
            assert isinstance(errors[b.base_url], broadcast.BroadcastError) and errors[a.base_url] is None
            assert await a.served_version() == (2, 0)
            ratio, _ = await ratios(a, ranks.policy)
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3)

    asyncio.run(run())


def test_two_fsdp_ranks_broadcast_the_weights_one_process_would(tiny_model: Path, tmp_path: Path) -> None:
    """Two trainer ranks (torchrun, gloo, FSDP2): the weights gathered tensor by tensor and
    broadcast in buckets are the ones the same gather writes to disk, and the engine serves them."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from services.trainer import checkpoint

    with running_pope(["engine", "--model", str(tiny_model), "--enable-deterministic-inference"], "/health") as proc:
        script = Path(__file__).with_name("broadcast_ranks.py")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        command += [str(script), proc.url, str(tmp_path / "ck"), str(tiny_model)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        lm = AutoModelForCausalLM.from_pretrained(str(checkpoint.weights_dir(tmp_path / "ck", 1)), dtype=torch.float32)
        stand_in = type("P", (), {"lm": lm})()

        async def check() -> None:
            async with EngineClient(proc.url) as engine:
                ratio, version = await ratios(engine, stand_in)
                assert version == 1
                assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3), ratio
                base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
                against_start, _ = await ratios(engine, type("P", (), {"lm": base})())
                assert not torch.allclose(against_start, torch.ones_like(against_start), atol=1e-3)  # it moved

        asyncio.run(check())


@pytest.mark.parametrize("in_flight", [False, True])
def test_the_fleet_broadcasts_and_falls_back_to_disk_for_an_engine_it_fails_for(
    two_engines: Any, tiny_model: Path, tmp_path: Path, in_flight: bool
) -> None:
    """``weight_sync: broadcast`` through the trainer's fleet: both engines get the weights
    by broadcast; an engine whose group broke gets the same step by disk, counted."""
    from prometheus_client import REGISTRY

    from services.common.messages import Lineage
    from services.trainer.fleet import Fleet

    a, b = (e.url for e in two_engines)
    ranks = trainer(tiny_model, tmp_path)
    settings = TrainerSettings(
        engine_url=a, engine_urls=[b], weight_sync="broadcast", in_flight_updates=in_flight, broadcast_timeout_s=30.0
    )
    fleet = Fleet(settings, None)
    fleet.bind(ranks, torch.float32, Lineage())

    def fallbacks() -> float:
        return REGISTRY.get_sample_value("pope_trainer_weight_sync_fallbacks_total") or 0.0

    async def run() -> None:
        try:
            for step in (1, 2):
                perturb(ranks.policy, step)
                path = ranks.save_weights(tmp_path / "ck", step, 0, torch.float32, 1 << 30)
                before = fallbacks()
                if step == 2:  # b's group is gone behind the fleet's back: this push is by disk for b
                    group = fleet.engines[b].group
                    assert group is not None
                    async with EngineClient(b) as direct:
                        await direct.destroy_weights_update_group(group.group_name)
                assert await fleet.push(path, step)
                assert fallbacks() - before == (1.0 if step == 2 else 0.0)
                for url in (a, b):
                    async with EngineClient(url) as engine:
                        ratio, version = await ratios(engine, ranks.policy)
                        assert version == step and torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3), ratio
                        assert (await engine.model_info()).weight_version == str(step)
        finally:
            await fleet.aclose()

    asyncio.run(run())
