"""The run record on a real Redis: the first service writes the run's shape, a service
with another shape or an older run's keys is refused with both values named, and
``pope up --fresh``'s deletion of the prefix starts a new run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.common.keys import Keys, adelete_prefix
from services.common.messages import RUN_FORMAT, RunShape
from services.common.redis_server import free_port
from services.common.run import RunMismatch, check_run_format, claim_run, read_run
from services.trainer.loop import Trainer
from services.trainer.sink import NoSink
from tests.integration.test_trainer import settings as trainer_settings


def shape(**kw: int) -> RunShape:
    fields = {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 16384, "max_staleness": 1, **kw}
    return RunShape(**fields, written_by="rollout (pid 1 on a)")


async def test_the_first_writer_wins_and_a_mismatch_is_refused_naming_both(aredis: Redis, keys: Keys) -> None:
    assert await check_run_format(aredis, keys) is None
    first = await claim_run(aredis, keys, shape())
    assert first.written_by == "rollout (pid 1 on a)" and await read_run(aredis, keys) == first
    assert await claim_run(aredis, keys, shape().model_copy(update={"written_by": "trainer (pid 2 on b)"})) == first
    with pytest.raises(RunMismatch) as refused:
        await claim_run(aredis, keys, shape(prompts_per_step=8).model_copy(update={"written_by": "trainer (pid 2)"}))
    message = str(refused.value)
    assert "trainer (pid 2) cannot join" in message and "prompts_per_step is 8 here but 2 in the run record" in message
    assert "written by rollout (pid 1 on a)" in message and "--fresh" in message
    await adelete_prefix(aredis, keys.prefix)  # what `pope up --fresh` does
    assert (await claim_run(aredis, keys, shape(prompts_per_step=8))).prompts_per_step == 8


async def test_an_older_run_or_record_is_refused_with_its_format(aredis: Redis, keys: Keys) -> None:
    await aredis.hset(keys.state("trainer"), mapping={"version": 3, "buffered": 0})  # run format 1's state
    for check in (claim_run(aredis, keys, shape()), check_run_format(aredis, keys)):
        with pytest.raises(RunMismatch, match="older pope-rl \\(run format 1"):
            await check
    await aredis.delete(keys.state("trainer"))
    await aredis.set(keys.run, b'{"schema_version": 1, "kind": "run", "run_format": 3}')
    with pytest.raises(RunMismatch, match=f"not one this pope-rl reads \\(run format {RUN_FORMAT}\\)"):
        await claim_run(aredis, keys, shape())


async def test_a_trainer_with_another_shape_does_not_start(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys, aredis: Redis
) -> None:
    await claim_run(aredis, keys, shape(prompts_per_step=32))
    trainer = await asyncio.to_thread(
        Trainer, trainer_settings(tiny_model, tmp_path, redis_url, keys, ""), aredis, NoSink()
    )
    with pytest.raises(RunMismatch, match=r"trainer .* cannot join .* prompts_per_step is 2 here but 32"):
        await asyncio.wait_for(trainer.run(asyncio.Event()), 30)


async def test_pope_trainer_with_another_shape_exits_non_zero_saying_why(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys, aredis: Redis
) -> None:
    """The service itself (a real `pope trainer`): the refusal reaches its exit, status 1 and
    the mismatch as the last line, not a plain 'killed by SIGTERM' a supervisor cannot explain."""
    await claim_run(aredis, keys, shape(prompts_per_step=32))
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "POPE_TRAINER__KEY_PREFIX": keys.prefix,
        "POPE_TRAINER__CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "POPE_TRAINER__METRICS_LOG": str(tmp_path / "metrics.jsonl"),
        "POPE_TRAINER__PROMPTS_PER_STEP": "2",
    }
    pope = str(Path(sys.executable).parent / "pope")
    cmd = [pope, "trainer", "--model", str(tiny_model), "--port", str(free_port()), "--engine-url", ""]
    done = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pope trainer: the training loop failed: RunMismatch(") and "prompts_per_step is 2" in last
