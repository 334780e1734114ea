"""The trainer's loop: read scored groups, train a GRPO step, save, ack, push weights.

    while running:
        take scored groups from pope:scored (consumer group "trainers")
        drop groups sampled more than max_staleness versions ago, or by weights a rewind
        lost (another lineage's), each counted
        once prompts_per_step groups are buffered:
            one optimizer step on them              -> version v + 1
            the engine's model directory            -> weights/step-<v+1>[@lineage]
            every save_every steps (and the last):
                the resume state                    -> step-<v+1>, durable
                ack every group it covers           (after the resume state, never before)
            push the model directory to the sink    (an engine: /update_weights_from_disk)

Exactly once in effect: a group is acked only once a durable resume state holds its effect
(its id is in that state's ledger), so a group redelivered after a crash is either in the
ledger (acked, not retrained) or not (trained once, on the restored weights). A resume that
rewinds past versions already pushed starts a new lineage (services.common.messages.Lineage):
the versions it makes are named apart ("11@1", not "11"), groups sampled by the lost
versions are dropped and counted, and an engine serving one is reloaded even when its step
looks ahead. A step whose directory or resume state cannot be written ends the process
(StepNotSaved). A group dropped untrained is recorded in the fsynced drop log before its
ack. The trainer's control state (version, lineage, buffer) is one TrainerControl record
(services.common.run); its metrics go to the history list, the metrics log and the
trackers (tracking.py: TensorBoard, wandb) only.
Buffered groups, and trained ones waiting for a resume state, keep their leases renewed.
A stop (SIGTERM) saves a resume state for the groups trained since the last one. Where the
weights go is the sink's business (sink.py): an engine, or nowhere (``NoSink``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.config import resolved
from services.common.keys import TRAINERS, Keys
from services.common.messages import (
    FinishReason,
    Lineage,
    MessageError,
    ScoredGroup,
    TrainerControl,
    decode,
    version_name,
)
from services.common.run import claim_run, read_control, shape_of, write_control
from services.common.streams import Entry, GroupReader
from services.trainer import checkpoint, policy, replay, tracking
from services.trainer.operations import Ranks
from services.trainer.settings import TrainerSettings
from services.trainer.sink import WeightSink
from services.trainer.world import World

MAX_HISTORY = 1000
"""Steps of metrics kept in memory for the trainer's GET /v1/history."""

log = logging.getLogger(__name__)

STEPS = Counter("pope_trainer_steps_total", "Optimizer steps taken")
GROUPS = Counter("pope_trainer_groups_total", "Scored groups, by what happened to them", ["outcome"])
VERSION = Gauge("pope_trainer_weight_version", "The trainer's current weight version (its step)")
LOSS = Gauge("pope_trainer_loss", "Loss of the last step")
REWARD = Gauge("pope_trainer_reward_mean", "Mean reward of the last step's groups", ["variant"])
STEP_METRIC = Gauge(
    "pope_trainer_step_metric",
    "Last step's metrics by variant (reward_mean, solve_rate, "
    "zero_variance_frac, clip_frac, approx_kl, entropy, response_len_mean, truncated, ...)",
    ["name", "variant"],
)
STEP_TIME = Gauge(
    "pope_trainer_step_time_seconds",
    "Where the last step's time went, by part "
    "(waiting_for_data, forward_backward, optimizer, weights, checkpoint, push)",
    ["part"],
)
COUNTED = ("staleness", "scoring")
"""The ``<kind>/<key>`` step metrics that count groups: a key absent from a step counted 0 then."""
STEP_SECONDS = Histogram(
    "pope_trainer_step_seconds",
    "Wall time of one optimizer step",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)


def export_step(stats: dict[str, float], counted_before: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """A step's ``<variant>/<name>`` metrics and ``time_*_s`` parts to Prometheus; a COUNTED
    metric the step before set and this one has not is set to 0 (this step had none of
    those groups), not left at the old count. Returns the COUNTED ones this step set."""
    counted: set[tuple[str, str]] = set()
    for key, value in stats.items():
        if "/" in key and not math.isnan(value):
            variant, name = key.split("/", 1)
            STEP_METRIC.labels(name, variant).set(value)
            if variant in COUNTED:
                counted.add((name, variant))
        elif key.startswith("time_") and key.endswith("_s"):
            STEP_TIME.labels(key.removeprefix("time_").removesuffix("_s")).set(value)
    for name, variant in counted_before - counted:
        STEP_METRIC.labels(name, variant).set(0.0)
    return counted


class StepNotSaved(RuntimeError):
    """An optimizer step whose checkpoint could not be written: the process must not go on
    with those weights (``run`` lets it out, so the service exits and is restarted)."""


class Trainer:
    """Owns the policy, its optimizer and the trainers' consumer; ``await run(stop)``.
    New weights go to ``sink`` (which it does not close)."""

    def __init__(self, settings: TrainerSettings, redis: Redis, sink: WeightSink, world: World | None = None) -> None:
        self.settings, self.redis, self.sink = settings, redis, sink
        self.keys = Keys(settings.key_prefix)
        torch.manual_seed(settings.seed)
        # Absolute: the path is sent to the engine, which may run from another directory.
        self.ckpt_dir = settings.checkpoint_dir.resolve()
        resume = checkpoint.latest(self.ckpt_dir)
        self.policy = policy.build(settings, world or World(device=settings.device), resume)
        self.ranks = Ranks(self.policy)
        self.state = self.policy.resumed or checkpoint.TrainerState()
        self.weights_dtype = settings.weights_dtype()
        if resume:
            log.info("resumed from %s at step %d", resume, self.state.step)
        self.history: deque[dict[str, float]] = deque(maxlen=MAX_HISTORY)
        self._counted: set[tuple[str, str]] = set()  # the COUNTED step metrics the last step set
        self._idle_since = time.monotonic()  # when the trainer last finished a step (data wait)
        self.lineage: Lineage = self.state.history
        sink.bind(self.ranks, self.weights_dtype, self.lineage)
        # The engine's model directory of the current version (None: the engine's start-up
        # weights are the current ones, nothing to push).
        self.weights: Path | None = checkpoint.weights_versions(self.ckpt_dir).get((self.version, self.lineage.id))
        self.trained = set(self.state.trained_group_ids)
        self.dropped = {row["group_id"]: row["reason"] for row in checkpoint.read_dropped(self.ckpt_dir)}
        self.reader = GroupReader(
            redis, self.keys, self.keys.scored, TRAINERS, settings.consumer_name, settings.streams
        )
        self.buffer: list[tuple[Entry, ScoredGroup]] = []
        self.in_flight: list[tuple[Entry, ScoredGroup]] = []  # the groups of the step being trained
        # Trained, still unacked: no resume state holds them yet (at most save_every steps' worth).
        self.uncovered: list[tuple[Entry, ScoredGroup]] = []
        self._unsaved_lineage = False  # a lineage begun here that no resume state holds yet
        self._serving_at_start: set[Path] = set()  # the engines' directories when this process began
        self._dirty = True  # the state in Redis is behind this object's
        self._weights_lock = asyncio.Lock()  # one of: checkpoint save, push, re-push
        self._stop = asyncio.Event()  # run's
        self.last: dict[str, float] = {}
        config = resolved(settings)
        self.record = checkpoint.run_record(config, settings.seed)
        # Last: a wandb run opened here is finished by run()'s end.
        self.tracker = tracking.for_settings(settings, redis, self.keys, config)
        VERSION.set(self.version)

    @property
    def version(self) -> int:
        return self.state.step

    async def run(self, stop: asyncio.Event) -> None:
        """Train until ``stop``. Redis and engine troubles are waited out; anything else
        is a bug and propagates (the service then exits, so a supervisor restarts it)."""
        self._stop = stop
        tasks = [asyncio.create_task(self._renew_leases(stop))]
        joined = False
        try:
            while not stop.is_set():
                try:
                    if not joined:  # RunMismatch (another run's shape or format) ends the service
                        await claim_run(self.redis, self.keys, shape_of(self.settings, "trainer"))
                        await self.reader.ensure_group()
                        await self._settle_lineage()
                        await self.publish_state()  # this process's version, before it trains its backlog
                        joined = True  # the watcher starts once the lineage is settled: never pushes a lost one
                        tasks.append(asyncio.create_task(self._watch_engine(stop)))
                    before = len(self.buffer)
                    for entry in await self.reader.read():
                        await self._accept(entry)
                    await self._drop_stale()
                    self._dirty |= len(self.buffer) != before  # the scheduler watches "buffered"
                    done = self.settings.max_steps is not None and self.version >= self.settings.max_steps
                    if len(self.buffer) >= self.settings.prompts_per_step and not done:
                        await self.step()
                    if self._dirty:
                        await self.publish_state()
                except RedisError as exc:
                    log.warning("redis error (%s); retrying", exc)
                    self.buffer.clear()  # still pending in Redis; re-read from the backlog
                    self.in_flight.clear()
                    self.reader.reset()
                    self._dirty = True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)
            if self.uncovered or self._unsaved_lineage:  # a stop keeps what a resume state lacks
                await self._save_resume()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(RedisError):
                await self.reader.hand_back(*[e.id for e, _ in self.buffer])
            await self.tracker.close()

    async def _accept(self, entry: Entry) -> None:
        try:
            group = decode(ScoredGroup, entry.data)
        except MessageError as exc:
            await self.reader.fail(entry, str(exc), retryable=False)
            GROUPS.labels("invalid").inc()
            return
        gid = group.group_id
        if (held := next((e for e, g in self.uncovered if g.group_id == gid), None)) is not None:
            if held.id != entry.id:  # another entry of the same group: a duplicate (the held one is acked later)
                await self.reader.ack(entry.id)
                GROUPS.labels("duplicate").inc()
            return  # trained, waiting for a resume state to hold it: stays pending, not retrained
        seen = gid in self.trained or gid in self.dropped
        if seen or any(g.group_id == gid for _, g in self.buffer):
            await self.reader.ack(entry.id)  # a redelivery: its effect is already counted
            GROUPS.labels("duplicate").inc()
            return
        if not all(self.lineage.holds(*v) for s in group.samples for v in s.versions):
            await self._drop([(entry, group)], "lineage")  # sampled by weights a rewind lost
            return
        if any(s.finish_reason is FinishReason.ABORT for s in group.samples):
            # Not a sample of the policy (the scheduler samples such groups again; this is
            # the last line): never trained, recorded, counted.
            await self._drop([(entry, group)], "aborted")
            return
        self.buffer.append((entry, group))

    async def _drop(self, groups: list[tuple[Entry, ScoredGroup]], reason: str) -> None:
        """Record ``groups`` as dropped untrained (durably), then ack them."""
        rows = [
            {"group_id": g.group_id, "reason": reason, "weight_version": g.weight_version, "at_version": self.version}
            for _, g in groups
        ]
        await asyncio.to_thread(checkpoint.append_dropped, self.ckpt_dir, rows)
        self.dropped.update((g.group_id, reason) for _, g in groups)
        await self.reader.ack(*[e.id for e, _ in groups])
        GROUPS.labels(f"dropped_{reason}").inc(len(groups))
        self._dirty = True

    def dropped_count(self, reason: str) -> int:
        return sum(r == reason for r in self.dropped.values())

    async def _settle_lineage(self) -> None:
        """Start a new lineage if this resume rewinds past versions that may have been
        pushed: any sign of a later step in this lineage, or of a newer lineage, on disk
        (the engine directories, written before any push), in Redis (the last control
        state) or on the engine (what it serves). Then make sure the current version has
        an engine directory, so an engine serving anything else can be reloaded with it."""
        seen: list[tuple[int, int]] = list(checkpoint.weights_versions(self.ckpt_dir))
        if (control := await read_control(self.redis, self.keys)) is not None:
            seen.append((control.version, control.lineage.id))
        on_disk = checkpoint.weights_versions(self.ckpt_dir)
        for served in await self.sink.served_versions():
            seen.append(served)
            # What an engine serves (a directory of an earlier process) is not pruned until
            # every engine has loaded this process's: an engine reads it again to roll back
            # a failed load.
            if (path := on_disk.get(served)) is not None:
                self._serving_at_start.add(path)
        mine = self.lineage.id
        if any(lineage > mine or (lineage == mine and step > self.version) for step, lineage in seen):
            new = self.lineage.fork(max([mine, *(lineage for _, lineage in seen)]) + 1, self.version)
            log.warning(
                "resuming at step %d of lineage %d, which had gone further (%s): continuing as lineage %d; "
                "groups sampled by the lost versions are dropped",
                self.version,
                mine,
                ", ".join(f"v{version_name(st, li)}" for st, li in sorted(set(seen)) if li > mine or st > self.version),
                new.id,
            )
            self.lineage, self.weights = new, None
            self.sink.bind(self.ranks, self.weights_dtype, new)  # pushes judge engines by it
            self.state.lineage = new.model_dump(mode="json")
            self._unsaved_lineage = True
            self._dirty = True
        if self.weights is None and (self.version > 0 or self.lineage.id > 0):
            self.weights = await asyncio.to_thread(self._save_weights)

    def _save_weights(self) -> Path:
        path = self.ranks.save_weights(
            self.ckpt_dir, self.version, self.lineage.id, self.weights_dtype, self.settings.weights_shard_mb << 20
        )
        in_use = {path, *self.sink.in_use, *self._serving_at_start}
        checkpoint.prune_weights(self.ckpt_dir, self.settings.keep_weights, in_use)
        return path

    async def _save_resume(self) -> None:
        """Write the resume state of the current version (durable), then ack every group it
        covers. StepNotSaved if it cannot be written."""
        try:
            await asyncio.to_thread(
                self.ranks.save_resume, self.ckpt_dir, self.state, self.record, self.settings.keep_checkpoints
            )
        except Exception as exc:
            raise StepNotSaved(
                f"the resume state of step {self.version} could not be written ({exc!r}); exiting so that a "
                "restart resumes from the last one"
            ) from exc
        acks = [e.id for e, _ in self.uncovered]
        self.uncovered, self._unsaved_lineage = [], False
        self._dirty = True
        await self._until_written("the trainer's state", self.publish_state)
        await self._until_written("the acks", lambda: self.reader.ack(*acks))  # the resume state holds their effect

    async def _drop_stale(self) -> None:
        limit = self.settings.max_staleness
        stale = [(e, g) for e, g in self.buffer if self.version - g.weight_version > limit]
        if not stale:
            return
        self.buffer = [(e, g) for e, g in self.buffer if self.version - g.weight_version <= limit]
        await self._drop(stale, "stale")
        log.info(
            "dropped %d stale groups (weight versions %s; trainer at %d, max_staleness %d)",
            len(stale),
            sorted({g.weight_version for _, g in stale}),
            self.version,
            limit,
        )

    async def step(self) -> None:
        """One optimizer step on the oldest buffered groups, then checkpoint, ack, push."""
        cfg = self.settings
        waited = time.monotonic() - self._idle_since
        self.in_flight, self.buffer = self.buffer[: cfg.prompts_per_step], self.buffer[cfg.prompts_per_step :]
        groups = [g for _, g in self.in_flight]
        started = time.monotonic()
        # From the optimizer step to the durable checkpoint nothing reads or writes Redis: a
        # failure there would leave the groups unacked on weights that already hold them.
        stats = await asyncio.to_thread(self.ranks.train, groups, self.version)
        ids = [g.group_id for g in groups]
        saving = time.monotonic()
        last = cfg.max_steps is not None and self.version + 1 >= cfg.max_steps
        covered = (self.version + 1) % cfg.save_every == 0 or last
        try:
            async with self._weights_lock:  # the engine watcher must not see a half-finished version
                self.state = self.state.advanced(ids, self.policy.scheduler.state_dict())
                self.trained.update(ids)
                if cfg.record_groups is not None:
                    await self._record_groups(groups)
                self.weights = await asyncio.to_thread(self._save_weights)
        except Exception as exc:
            # The weights hold a step the engine cannot load: exit; a restart resumes from
            # the last resume state (nothing of this step is acked).
            raise StepNotSaved(
                f"trainer step {self.version} was taken but its model directory was not written ({exc!r}); "
                "exiting so that a restart resumes from the last resume state"
            ) from exc
        self.uncovered += self.in_flight
        self.in_flight = []
        stats["time_weights_s"] = time.monotonic() - saving
        # What follows reports the step, and each Redis write is repeated until it lands, so
        # a Redis outage here loses no step's record. The new version is out before any ack:
        # a scheduler never sees the groups gone and the old version (which would look like
        # a trainer short of groups with none on the way).
        if covered:
            saving = time.monotonic()
            await self._save_resume()  # publishes the state, then acks what it covers
            stats["time_checkpoint_s"] = time.monotonic() - saving
        else:
            stats["time_checkpoint_s"] = 0.0
            self._dirty = True
            await self._until_written("the trainer's state", self.publish_state)
        pushing = time.monotonic()
        async with self._weights_lock:
            pushed = await self.sink.push(self.weights, self.version, self.lineage.id)
            if pushed:
                self._serving_at_start.clear()  # the sink knows what is served from now on
        stats.update(
            time_push_s=time.monotonic() - pushing,
            pushed=float(pushed),
            time_waiting_for_data_s=waited,
            step_seconds=time.monotonic() - started,
            version=float(self.version),
        )
        stats["tokens_per_s"] = stats["tokens"] / max(stats["time_forward_backward_s"], 1e-9)
        self._record(stats)
        await self.tracker.on_step(self.version, stats, groups)
        record = json.dumps({"step": self.version, "at": time.time(), **_finite(stats)})

        async def add_to_history() -> None:  # for the rollout service's /v1/status
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lpush(self.keys.history("trainer"), record)
                pipe.ltrim(self.keys.history("trainer"), 0, cfg.history_len - 1)
                await pipe.execute()

        await self._until_written("the step's metrics", add_to_history)
        self._idle_since = time.monotonic()

    async def _record_groups(self, groups: list[ScoredGroup]) -> None:
        """Append the step's groups to ``record_groups`` (a debugging record: a failed write
        is logged, the training goes on)."""
        assert self.settings.record_groups is not None
        try:
            await asyncio.to_thread(replay.record, self.settings.record_groups, self.version, self.lineage.id, groups)
        except OSError as exc:
            log.warning(
                "step %d: could not record its groups in %s (%s)", self.version, self.settings.record_groups, exc
            )

    async def _until_written(self, what: str, write: Any) -> None:
        """``await write()`` until no RedisError (backoff 0.2 s doubling to 5 s); a stopping
        trainer gives up and lets the error out (redelivery and resume cover the rest)."""
        delay = 0.2
        while True:
            try:
                await write()
                return
            except RedisError as exc:
                if self._stop.is_set():
                    raise
                log.warning("step %d is saved; writing %s failed (%s), again in %.1fs", self.version, what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _record(self, stats: dict[str, float]) -> None:
        """Metrics of one step: Prometheus, the JSONL log, /v1/history, and the log line
        (TensorBoard and wandb: ``self.tracker``)."""
        self.last = stats
        self.history.append(stats)
        STEPS.inc()
        GROUPS.labels("trained").inc(int(stats["groups"]))
        VERSION.set(self.version)
        LOSS.set(stats["loss"])
        STEP_SECONDS.observe(stats["step_seconds"])
        self._counted = export_step(stats, self._counted)
        path = self.settings.metrics_log
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": self.version, "at": time.time(), **_finite(stats)}) + "\n")
        log.info(
            "step %d: loss %.4f, reward hinted %.3f unhinted %.3f, ratio max %.4f, clip %.3f, kl %.2e, "
            "entropy %.3f, grad norm %.3f, %d tokens, %.1fs (push %.2fs)",
            self.version,
            stats["loss"],
            stats["reward_hinted"],
            stats["reward_unhinted"],
            stats["ratio_max"],
            stats["clip_frac"],
            stats["approx_kl_mean"],
            stats["entropy_mean"],
            stats["grad_norm"],
            stats["tokens"],
            stats["step_seconds"],
            stats["time_push_s"],
        )

    async def publish_state(self) -> None:
        """The control state the rollout scheduler reads; retried each pass until it lands."""
        control = TrainerControl(
            version=self.version,
            buffered=len(self.buffer),
            dropped_stale=self.dropped_count("stale"),
            dropped_aborted=self.dropped_count("aborted"),
            dropped_lineage=self.dropped_count("lineage"),
            awaiting_checkpoint=len(self.uncovered),
            lineage=self.lineage,
            max_steps=self.settings.max_steps,
            instance=self.settings.consumer_name,
        )
        await write_control(self.redis, self.keys, control)
        self._dirty = False

    async def _renew_leases(self, stop: asyncio.Event) -> None:
        period = self.settings.streams.lease_ms / 3000
        while not stop.is_set():
            await asyncio.sleep(period)
            with contextlib.suppress(RedisError):
                await self.reader.renew(*[e.id for e, _ in self.buffer + self.in_flight + self.uncovered])

    async def _watch_engine(self, stop: asyncio.Event) -> None:
        """Every ``repush_interval_s``: every engine checked and, if it serves anything but
        the current version, loaded with it (one that restarted serves its start-up
        weights, one that kept a lost lineage's may even look ahead); the router and the
        engine registry put right (fleet.py). A failed load is tried again next time."""
        while not stop.is_set():
            async with self._weights_lock:
                if await self.sink.reconcile(self.weights, self.version, self.lineage):
                    self._serving_at_start.clear()  # every engine serves this process's weights
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.repush_interval_s)


def _finite(stats: dict[str, float]) -> dict[str, float | None]:
    """NaN (e.g. the reward of a variant absent from the step) as null, so the JSON is valid."""
    return {k: (None if math.isnan(v) else v) for k, v in stats.items()}
