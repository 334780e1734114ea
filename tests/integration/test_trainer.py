"""The trainer against a real Redis and a real CPU engine: the engine/trainer seam (ratio 1
on the first on-policy step), weight versions, checkpoints, stale drops, resume."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from redis.asyncio import Redis
from safetensors.torch import load_file

from services.common.engine_client import EngineClient, SamplingParams
from services.common.keys import TRAINERS, Keys
from services.common.messages import FinishReason, RawGroup, Sample, Score, ScoredGroup
from services.common.run import read_control
from services.common.streams import DeliveryPolicy, publish
from services.trainer import checkpoint, policy, replay
from services.trainer.fleet import Fleet
from services.trainer.loop import Trainer
from services.trainer.operations import Ranks
from services.trainer.settings import TrainerSettings
from services.trainer.sink import NoSink
from services.trainer.world import World
from tests.conftest import running_engine

PROMPTS = [[1, 87, 85, 261, 201], [1, 40, 41, 42]]
POLICY = DeliveryPolicy(block_ms=100)


@pytest.fixture(scope="module")
def engine_url(tiny_model: Path) -> Iterator[str]:
    with running_engine(tiny_model) as url:  # its own: the trainer pushes weights into it
        yield url


@pytest.fixture
async def engine(engine_url: str) -> AsyncIterator[EngineClient]:
    async with EngineClient(engine_url) as client:
        yield client


def settings(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys, engine_url: str, **kw: Any
) -> TrainerSettings:
    return TrainerSettings(
        model_path=str(tiny_model),
        checkpoint_dir=tmp_path / "ckpt",
        redis_url=redis_url,
        metrics_log=tmp_path / "metrics.jsonl",
        tensorboard_dir=None,
        key_prefix=keys.prefix,
        engine_url=engine_url,
        prompts_per_step=2,
        group_size=4,
        streams=POLICY,
        **kw,
    )


async def sample_groups(engine: EngineClient, step: int, rewards: list[list[float]]) -> list[ScoredGroup]:
    """Real engine samples (temperature 0.8) with planted rewards, as the verifier would score them."""
    outs = await engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=12, temperature=0.8, sampling_seed=step))
    groups = []
    for i, prompt in enumerate(PROMPTS):
        copies = outs[4 * i : 4 * i + 4]
        samples = [
            Sample(
                problem_id=f"p{i}",
                variant="hinted" if i == 0 else "unhinted",
                prompt_ids=prompt,
                completion_ids=o.output_ids,
                logprobs=o.logprobs,
                finish_reason=o.finish_reason,
                weight_version=o.weight_version,
                text=o.text,
            )
            for o in copies
        ]
        raw = RawGroup(
            group_id=f"s{step}-g{i}",
            problem_id=f"p{i}",
            variant=samples[0].variant,
            prompt="q",
            answer="1",
            samples=samples,
            weight_version=min(s.weight_version for s in samples),
            step=step,
            temperature=0.8,
        )
        groups.append(ScoredGroup.from_raw(raw, [Score(reward=r) for r in rewards[i]]))
    return groups


async def wait_version(r: Redis, keys: Keys, version: int, within_s: float = 60) -> None:
    """Until the trainer's control state says ``version`` and that step is recorded (its
    history entry is written last, after the ack and the push)."""
    async with asyncio.timeout(within_s):
        while (control := await read_control(r, keys)) is None or control.version < version:
            await asyncio.sleep(0.05)
        while (last := await r.lindex(keys.history("trainer"), 0)) is None or json.loads(last)["step"] < version:
            await asyncio.sleep(0.05)


async def test_train_push_drop_stale_and_resume(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys, aredis: Redis, engine: EngineClient, engine_url: str
) -> None:
    await engine.update_weights_from_disk(str(tiny_model), 0)  # the engine starts each test at v0
    cfg = settings(
        tiny_model,
        tmp_path,
        redis_url,
        keys,
        engine_url,
        max_staleness=1,
        repush_interval_s=0.2,
        record_groups=tmp_path / "groups.jsonl",
    )
    trainer = await asyncio.to_thread(Trainer, cfg, aredis, Fleet(cfg, aredis))
    stop = asyncio.Event()
    task = asyncio.create_task(trainer.run(stop))
    try:
        # Sampled now, at v0: by the time it arrives the trainer is at v2, two versions on.
        stale = (await sample_groups(engine, 99, [[1, 0, 1, 0], [1, 0, 1, 0]]))[0].model_copy(
            update={"group_id": "stale"}
        )
        # Step 1: on-policy groups sampled by the engine at v0.
        for g in await sample_groups(engine, 1, [[1, 0, 0, 1], [0, 0, 1, 0]]):
            await publish(aredis, keys.scored, g, POLICY)
        await wait_version(aredis, keys, 1)
        first = trainer.last
        # The engine/trainer seam: same weights, same temperature -> ratio 1 up to float error.
        assert abs(first["ratio_max"] - 1.0) < 1e-3 and abs(first["ratio_mean"] - 1.0) < 1e-4, first
        assert first["approx_kl_mean"] < 1e-8, first  # k3(engine || trainer) per token
        assert first["reward_hinted"] == 0.5 and first["reward_unhinted"] == 0.25 and first["tokens"] > 0
        assert await engine.weight_version() == 1  # pushed and served

        # An engine that restarts serves its start-up weights (v0): the trainer re-pushes v1.
        await engine.update_weights_from_disk(str(tiny_model), 0)
        async with asyncio.timeout(30):
            while await engine.weight_version() != 1:
                await asyncio.sleep(0.1)

        # Step 2 on groups sampled at v1; the group sampled at v0 is then 2 behind and dropped.
        for g in await sample_groups(engine, 2, [[0, 1, 0, 0], [1, 1, 0, 0]]):
            await publish(aredis, keys.scored, g, POLICY)
        await wait_version(aredis, keys, 2)
        assert await engine.weight_version() == 2
        assert stale.weight_version == 0
        await publish(aredis, keys.scored, stale, POLICY)
        # A group with a sample the engine aborted (paused, restarting) is never trained.
        (aborted,) = [
            g.model_copy(
                update={
                    "group_id": "aborted",
                    "samples": [g.samples[0].model_copy(update={"finish_reason": FinishReason.ABORT}), *g.samples[1:]],
                }
            )
            for g in (await sample_groups(engine, 3, [[1, 1, 1, 1], [0, 0, 0, 0]]))[:1]
        ]
        await publish(aredis, keys.scored, aborted, POLICY)
        async with asyncio.timeout(30):
            while trainer.dropped_count("stale") < 1 or trainer.dropped_count("aborted") < 1:
                await asyncio.sleep(0.02)
            while (control := await read_control(aredis, keys)) is None or control.dropped_aborted < 1:
                await asyncio.sleep(0.02)
        assert control.dropped_stale == 1 and control.version == 2 and control.buffered == 0
        assert trainer.version == 2
    finally:
        stop.set()
        await task
    assert (await aredis.xpending(keys.scored, TRAINERS))["pending"] == 0

    ckpt = checkpoint.latest(cfg.checkpoint_dir.resolve())
    assert ckpt is not None and ckpt.name == "step-000002" and (ckpt / "dcp" / ".metadata").is_file()
    # Both drops are on disk (fsynced before their acks), with why.
    assert {(r["group_id"], r["reason"]) for r in checkpoint.read_dropped(cfg.checkpoint_dir)} == {
        ("stale", "stale"),
        ("aborted", "aborted"),
    }
    lines = [json.loads(x) for x in cfg.metrics_log.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]  # the JSONL metrics log, one line per step
    assert lines[0]["hinted/reward_mean"] == 0.5 and lines[0]["unhinted/solve_rate"] == 1.0
    assert lines[0]["staleness/0"] == 2 and lines[0]["time_push_s"] > 0 and lines[0]["pushed"] == 1
    record = json.loads((ckpt / "run_record.json").read_text())
    assert record["config"]["learning_rate"] == 1e-6 and record["seeds"] == {"trainer": 0}
    assert record["packages"]["torch"].startswith("2.13") and "git_commit" in record

    # The recorded groups replay (no Redis, no engine) to the very same engine directories.
    replayed = cfg.model_copy(update={"checkpoint_dir": tmp_path / "replay", "metrics_log": tmp_path / "r.jsonl"})
    assert [n for n, _ in replay.read(cfg.record_groups)] == [1, 2]  # type: ignore[arg-type]
    ranks = Ranks(policy.build(replayed, World(), None))
    assert replay.replay(ranks, cfg.record_groups) == 2  # type: ignore[arg-type]
    live, again_ = (checkpoint.weights_dir(d, 2) for d in (cfg.checkpoint_dir, replayed.checkpoint_dir))
    base = load_file(str(tiny_model / "model.safetensors"))
    for shard in live.glob("*.safetensors"):
        ours, theirs = load_file(str(shard)), load_file(str(again_ / shard.name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert not all(torch.equal(ours[k], base[k]) for k in ours)  # the steps moved the weights
    assert [json.loads(x)["loss"] for x in replayed.metrics_log.read_text().splitlines()] == [x["loss"] for x in lines]

    # Resume: a new trainer picks up at step 2 and does not retrain a redelivered group.
    again = await asyncio.to_thread(Trainer, cfg, aredis, Fleet(cfg, aredis))
    assert again.version == 2 and "s1-g0" in again.trained and again.dropped == {"stale": "stale", "aborted": "aborted"}
    stop = asyncio.Event()
    task = asyncio.create_task(again.run(stop))
    try:
        for g in await sample_groups(engine, 1, [[1, 0, 0, 1], [0, 0, 1, 0]]):  # same ids as step 1, at v2
            await publish(aredis, keys.scored, g, POLICY)
        async with asyncio.timeout(30):
            while (await aredis.xpending(keys.scored, TRAINERS))["pending"] or (await aredis.xlen(keys.scored)) < 8:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0)
        assert again.buffer == [] and again.version == 2
    finally:
        stop.set()
        await task


async def test_the_optimizer_takes_the_adam_settings(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys, aredis: Redis
) -> None:
    default = await asyncio.to_thread(
        Trainer, settings(tiny_model, tmp_path / "a", redis_url, keys, ""), aredis, NoSink()
    )
    adam = default.policy.optimizer.param_groups[0]
    assert (tuple(adam["betas"]), adam["eps"]) == ((0.9, 0.999), 1e-8)
    cfg = settings(tiny_model, tmp_path / "b", redis_url, keys, "", adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-5)
    trainer = await asyncio.to_thread(Trainer, cfg, aredis, NoSink())
    group = trainer.policy.optimizer.param_groups[0]
    assert (tuple(group["betas"]), group["eps"]) == ((0.8, 0.95), 1e-5)
