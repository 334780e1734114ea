"""The run's two shared records, each written and read here and nowhere else:

    await claim_run(redis, keys, shape_of(settings, "trainer"))  # first writer wins; others compare
    await write_control(redis, keys, TrainerControl(...)) # the trainer, after each change
    control = await read_control(redis, keys)             # the scheduler; None before any

``claim_run`` refuses to start a service whose run shape (group size, prompts per step,
max new tokens, max staleness) differs from the run record, naming both values and who
wrote the record, and refuses the keys of a run written by an older pope-rl (another
``run_format``, or format 1's trainer state hash with no run record): such a run is never
half-read. ``pope up --fresh`` (or another key prefix) starts a new run.
"""

from __future__ import annotations

import os
import socket

from redis.asyncio import Redis

from services.common.keys import Keys
from services.common.messages import RUN_FORMAT, MessageError, RunShape, TrainerControl, decode, encode


class RunMismatch(RuntimeError):
    """This service cannot join the run under its key prefix (shape or format differ)."""


def _fresh_start(keys: Keys) -> str:
    return (
        f"start a new run with `pope up --fresh` (which deletes the keys under {keys.prefix!r}) "
        "or use another key_prefix"
    )


async def claim_run(redis: Redis, keys: Keys, shape: RunShape) -> RunShape:
    """Write ``shape`` as the run record if there is none; else check it against the
    record. Returns the record in force; raises RunMismatch."""
    if not await redis.exists(keys.run):
        if await _older_run(redis, keys):
            raise RunMismatch(
                f"the Redis keys under {keys.prefix!r} were written by an older pope-rl (run format 1: a trainer "
                f"state hash, no run record); this one reads run format {RUN_FORMAT} only: {_fresh_start(keys)}"
            )
        await redis.set(keys.run, encode(shape), nx=True)
    record = await read_run(redis, keys)
    if record is None:  # deleted between the two calls: a --fresh elsewhere; try again
        return await claim_run(redis, keys, shape)
    if diffs := shape.differences(record):
        raise RunMismatch(
            f"{shape.written_by} cannot join the run under {keys.prefix!r}: {'; '.join(diffs)} "
            f"(written by {record.written_by} at {record.written_at:%Y-%m-%d %H:%M:%S} UTC). Declare the run's "
            f"shape once, in the config's shared section, or {_fresh_start(keys)}"
        )
    return record


async def check_run_format(redis: Redis, keys: Keys) -> RunShape | None:
    """For a service that has no shape of its own (the verifier): refuse an older run's
    keys; the record, or None before any service wrote it."""
    record = await read_run(redis, keys)
    if record is None and await _older_run(redis, keys):
        raise RunMismatch(
            f"the Redis keys under {keys.prefix!r} were written by an older pope-rl (run format 1: no run record): "
            f"{_fresh_start(keys)}"
        )
    return record


async def read_run(redis: Redis, keys: Keys) -> RunShape | None:
    raw = await redis.get(keys.run)
    if raw is None:
        return None
    try:
        return decode(RunShape, raw)
    except MessageError as exc:
        raise RunMismatch(
            f"the run record {keys.run} is not one this pope-rl reads (run format {RUN_FORMAT}): {exc}. "
            f"{_fresh_start(keys).capitalize()}"
        ) from exc


async def _older_run(redis: Redis, keys: Keys) -> bool:
    """The keys of a run of format 1: its trainer state was a hash (now a TrainerControl
    string), and there was no run record."""
    return bool(await redis.type(keys.state("trainer")) in (b"hash", "hash"))


async def write_control(redis: Redis, keys: Keys, control: TrainerControl) -> None:
    await redis.set(keys.state("trainer"), encode(control))


async def read_control(redis: Redis, keys: Keys) -> TrainerControl | None:
    """The trainer's control state; None before a trainer has written it."""
    raw = await redis.get(keys.state("trainer"))
    if raw is None:
        return None
    try:
        return decode(TrainerControl, raw)
    except MessageError as exc:
        raise RunMismatch(f"{keys.state('trainer')} is not a TrainerControl this pope-rl reads: {exc}") from exc


def shape_of(settings: object, service: str) -> RunShape:
    """The run shape a service's settings declare (rollout and trainer have all four),
    signed with the service and this process."""
    who = f"{service} (pid {os.getpid()} on {socket.gethostname()})"
    return RunShape(**{f: getattr(settings, f) for f in RunShape.SHAPE_FIELDS}, written_by=who)
