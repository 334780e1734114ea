"""The trainer under faults between its optimizer step and the durable checkpoint, on a real
Redis: no group is ever trained twice on weights that already hold it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from services.common.keys import TRAINERS, Keys
from services.common.messages import Score, ScoredGroup, Variant
from services.common.run import read_control
from services.common.streams import publish
from services.trainer import checkpoint, policy
from services.trainer.loop import StepNotSaved, Trainer
from services.trainer.settings import TrainerSettings
from services.trainer.sink import NoSink
from tests.factories import group
from tests.integration.test_trainer import POLICY
from tests.integration.test_trainer import settings as trainer_settings


def scored(group_id: str) -> ScoredGroup:
    raw = group(group_id, f"p-{group_id}", Variant.UNHINTED, size=4)
    return ScoredGroup.from_raw(raw, [Score(reward=r) for r in (1.0, 0.0, 0.0, 1.0)])


def settings(tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys) -> TrainerSettings:
    """test_trainer's settings, with no engine (NoSink), no stale drops, and a resume state
    every step (what these faults hit)."""
    return trainer_settings(tiny_model, tmp_path, redis_url, keys, "", max_staleness=100, save_every=1)


def optimizer_steps(trainer: Trainer) -> int:
    """How many times AdamW has stepped (its per-parameter step count)."""
    (state, *_) = trainer.policy.optimizer.state.values()
    return int(torch.as_tensor(state["step"]).item())


async def until(condition: Any, within_s: float = 60) -> None:
    async with asyncio.timeout(within_s):
        while not condition():
            await asyncio.sleep(0.02)


async def test_a_redis_error_after_the_optimizer_step_never_trains_the_groups_again(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys, aredis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first Redis command the first step sends after the optimizer has stepped fails,
    as a dropped connection does. The step's groups must not come back into another optimizer
    step: each group is in exactly one, and AdamW stepped once per trainer step."""
    trainer = await asyncio.to_thread(Trainer, settings(tiny_model, tmp_path, redis_url, keys), aredis, NoSink())
    stepped: list[list[str]] = []
    armed = [False]
    real_step, real_command = policy.train_step, aredis.execute_command
    run_task: list[asyncio.Task[None]] = []

    def counting_step(*args: Any, **kwargs: Any) -> dict[str, float]:
        stats = real_step(*args, **kwargs)
        stepped.append(sorted(g.group_id for g in args[4]))
        armed[0] = len(stepped) == 1  # the first step only: one transient fault
        return stats

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if armed[0] and asyncio.current_task() is run_task[0]:
            armed[0] = False
            raise RedisConnectionError("injected: connection lost after the optimizer step")
        return await real_command(*args, **kwargs)

    monkeypatch.setattr(policy, "train_step", counting_step)
    monkeypatch.setattr(aredis, "execute_command", flaky)
    stop = asyncio.Event()
    run_task.append(asyncio.create_task(trainer.run(stop)))
    try:
        for gid in ("a", "b"):
            await publish(aredis, keys.scored, scored(gid), POLICY)
        await until(lambda: trainer.version >= 1 and not armed[0])
        for gid in ("c", "d"):
            await publish(aredis, keys.scored, scored(gid), POLICY)
        await until(lambda: trainer.version >= 2)
        await asyncio.sleep(0.5)  # time for a wrongly redelivered group to be trained again
    finally:
        stop.set()
        await run_task[0]
    assert stepped == [["a", "b"], ["c", "d"]]
    assert optimizer_steps(trainer) == trainer.version == 2
    assert (await aredis.xpending(keys.scored, TRAINERS))["pending"] == 0
    ckpt = checkpoint.latest(trainer.ckpt_dir)
    assert ckpt is not None and checkpoint.load_state(ckpt).trained_group_ids == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("writer", "says"),
    [
        ("finish_resume", "the resume state of step 1 could not be written"),
        ("save_weights", "trainer step 1 was taken but its model directory was not written"),
    ],
)
async def test_a_checkpoint_that_cannot_be_written_stops_the_trainer(
    tiny_model: Path,
    tmp_path: Path,
    redis_url: str,
    keys: Keys,
    aredis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    writer: str,
    says: str,
) -> None:
    """A failed save after the optimizer step (the resume state, or the engine's model
    directory) ends ``run`` with StepNotSaved (the service exits and resumes from its last
    resume state); the groups stay pending for that restart."""
    cfg = settings(tiny_model, tmp_path, redis_url, keys)
    trainer = await asyncio.to_thread(Trainer, cfg, aredis, NoSink())

    def full_disk(*args: Any, **kwargs: Any) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, writer, full_disk)
    for gid in ("a", "b"):
        await publish(aredis, keys.scored, scored(gid), POLICY)
    with pytest.raises(StepNotSaved, match=says):
        await asyncio.wait_for(trainer.run(asyncio.Event()), 60)
    assert (await aredis.xpending(keys.scored, TRAINERS))["pending"] == 2
    monkeypatch.undo()
    again = await asyncio.to_thread(Trainer, cfg, aredis, NoSink())  # the restart: from scratch, no checkpoint
    assert again.version == 0 and not again.trained


async def test_a_redis_error_at_the_ack_after_a_checkpoint_loses_no_record_of_the_step(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys, aredis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ack of a saved step fails once (seen in the chaos run: that step's metrics line,
    history entry and log line were lost). The ack is written again until it lands, the step
    is recorded, and the new version was out before the ack, so the scheduler never sees the
    groups gone with the old version (which reads as a trainer short of groups)."""
    cfg = settings(tiny_model, tmp_path, redis_url, keys)
    trainer = await asyncio.to_thread(Trainer, cfg, aredis, NoSink())
    real_ack = trainer.reader.ack
    seen: list[int | None] = []

    async def flaky_ack(*ids: str) -> None:
        control = await read_control(aredis, keys)
        seen.append(control.version if control else None)
        if len(seen) == 1:
            raise RedisConnectionError("injected: connection lost at the ack")
        await real_ack(*ids)

    monkeypatch.setattr(trainer.reader, "ack", flaky_ack)
    stop = asyncio.Event()
    task = asyncio.create_task(trainer.run(stop))
    try:
        for gid in ("a", "b"):
            await publish(aredis, keys.scored, scored(gid), POLICY)
        await until(lambda: trainer.version >= 1 and len(seen) >= 2)
        await until(lambda: cfg.metrics_log.exists())
    finally:
        stop.set()
        await task
    assert seen[:2] == [1, 1]  # v1 was published before the ack, both times
    assert [json.loads(x)["step"] for x in cfg.metrics_log.read_text().splitlines()] == [1]
    assert [json.loads(x)["step"] for x in await aredis.lrange(keys.history("trainer"), 0, -1)] == [1]
    assert (await aredis.xpending(keys.scored, TRAINERS))["pending"] == 0 and optimizer_steps(trainer) == 1


async def test_groups_are_acked_only_once_a_resume_state_holds_them(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys, aredis: Redis
) -> None:
    """save_every 2: step 1's groups stay pending (trained, awaiting a resume state, their
    leases renewed) and are neither retrained nor acked when another entry of one comes in
    (that duplicate is acked); step 2's resume state holds all four, and all are acked."""
    cfg = trainer_settings(tiny_model, tmp_path, redis_url, keys, "", max_staleness=100, save_every=2)
    trainer = await asyncio.to_thread(Trainer, cfg, aredis, NoSink())
    stop = asyncio.Event()
    task = asyncio.create_task(trainer.run(stop))

    async def pending() -> int:
        return int((await aredis.xpending(keys.scored, TRAINERS))["pending"])

    try:
        for gid in ("a", "b"):
            await publish(aredis, keys.scored, scored(gid), POLICY)
        await until(lambda: trainer.version == 1 and len(trainer.uncovered) == 2)
        assert checkpoint.latest(trainer.ckpt_dir) is None and (1, 0) in checkpoint.weights_versions(trainer.ckpt_dir)
        control = await read_control(aredis, keys)
        assert control is not None and control.awaiting_checkpoint == 2 and await pending() == 2
        await publish(aredis, keys.scored, scored("a"), POLICY)  # another entry of a trained group
        async with asyncio.timeout(30):
            while await pending() != 2 or trainer.buffer:
                await asyncio.sleep(0.05)
        assert optimizer_steps(trainer) == 1 and trainer.version == 1
        for gid in ("c", "d"):
            await publish(aredis, keys.scored, scored(gid), POLICY)
        await until(lambda: trainer.version == 2 and not trainer.uncovered)
        async with asyncio.timeout(30):
            while await pending():
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    state = checkpoint.load_state(checkpoint.latest(trainer.ckpt_dir))  # type: ignore[arg-type]
    assert state.step == 2 and state.trained_group_ids == ["a", "b", "c", "d"]
