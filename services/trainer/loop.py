"""The trainer's loop: read scored groups, train a GRPO step, checkpoint, ack, push weights.

    while running:
        take scored groups from pope:scored (consumer group "trainers")
        drop groups sampled more than max_staleness versions ago (counted)
        once prompts_per_step groups are buffered:
            one optimizer step on them            -> version v + 1
            checkpoint (HF safetensors + state)   -> durable
            ack those groups                      (after the checkpoint, never before)
            /update_weights_from_disk on the engine, version "v + 1"

Exactly once in effect: the checkpoint records the ids of the groups it trained, so a
group redelivered after a crash between checkpoint and ack is acked, not retrained.
Buffered groups keep their leases renewed while a step runs. An engine that restarted
(serving its start-up weights) is noticed and re-pushed the latest checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.config import resolved
from services.common.engine_client import EngineClient, EngineError
from services.common.keys import TRAINERS, Keys
from services.common.messages import MessageError, ScoredGroup, Variant, WeightsUpdated, decode
from services.common.streams import Entry, GroupReader, publish
from services.trainer import checkpoint
from services.trainer.batch import collate, rows_from_groups
from services.trainer.grpo import policy_loss, token_logprobs
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

STEPS = Counter("pope_trainer_steps_total", "Optimizer steps taken")
GROUPS = Counter("pope_trainer_groups_total", "Scored groups, by what happened to them", ["outcome"])
VERSION = Gauge("pope_trainer_weight_version", "The trainer's current weight version (its step)")
LOSS = Gauge("pope_trainer_loss", "Loss of the last step")
REWARD = Gauge("pope_trainer_reward_mean", "Mean reward of the last step's groups", ["variant"])
STEP_SECONDS = Histogram("pope_trainer_step_seconds", "Wall time of one optimizer step",
                         buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))  # fmt: skip


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Trainer:
    """Owns the policy, its optimizer and the trainers' consumer; ``await run(stop)``."""

    def __init__(self, settings: TrainerSettings, redis: Redis, engine: EngineClient | None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if settings.kl_coef > 0:
            raise ValueError("trainer.kl_coef > 0 needs a reference model, which this trainer does not load yet")
        self.settings, self.redis, self.engine = settings, redis, engine
        self.keys = Keys(settings.key_prefix)
        torch.manual_seed(settings.seed)
        # Absolute: the path is sent to the engine, which may run from another directory.
        self.ckpt_dir = settings.checkpoint_dir.resolve()
        resume = checkpoint.latest(self.ckpt_dir)
        source = str(resume) if resume else settings.model_path
        if source is None:
            raise ValueError("no model to train: set trainer.model_path (or --model), or resume from checkpoint_dir")
        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        self.model: Any = model.to(settings.device)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(source)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.learning_rate,
                                           weight_decay=settings.weight_decay)  # fmt: skip
        self.state = checkpoint.TrainerState()
        if resume:
            self.state = checkpoint.load_state(resume)
            checkpoint.load_optimizer(resume, self.optimizer)
            log.info("resumed from %s at step %d", resume, self.state.step)
        self.trained = set(self.state.trained_group_ids)
        self.reader = GroupReader(redis, self.keys, self.keys.scored, TRAINERS, settings.consumer_name,
                                  settings.streams)  # fmt: skip
        self.buffer: list[tuple[Entry, ScoredGroup]] = []
        self.in_flight: list[tuple[Entry, ScoredGroup]] = []  # the groups of the step being trained
        self._dirty = True  # the state in Redis is behind this object's
        self._weights_lock = asyncio.Lock()  # one of: checkpoint save, push, re-push
        self.last: dict[str, float] = {}
        self.record = checkpoint.run_record(resolved(settings), settings.seed)
        VERSION.set(self.version)

    @property
    def version(self) -> int:
        return self.state.step

    async def run(self, stop: asyncio.Event) -> None:
        """Train until ``stop``. Redis and engine troubles are waited out; anything else
        is a bug and propagates (the service then exits, so a supervisor restarts it)."""
        await self.reader.ensure_group()
        tasks = [asyncio.create_task(self._renew_leases(stop)), asyncio.create_task(self._watch_engine(stop))]
        try:
            while not stop.is_set():
                try:
                    before = len(self.buffer)
                    for entry in await self.reader.read():
                        await self._accept(entry)
                    await self._drop_stale()
                    self._dirty |= len(self.buffer) != before  # the scheduler watches "buffered"
                    if len(self.buffer) >= self.settings.prompts_per_step:
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
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(RedisError):
                await self.reader.hand_back(*[e.id for e, _ in self.buffer])

    async def _accept(self, entry: Entry) -> None:
        try:
            group = decode(ScoredGroup, entry.data)
        except MessageError as exc:
            await self.reader.fail(entry, str(exc), retryable=False)
            GROUPS.labels("invalid").inc()
            return
        if group.group_id in self.trained or any(g.group_id == group.group_id for _, g in self.buffer):
            await self.reader.ack(entry.id)  # a redelivery: its effect is already counted
            GROUPS.labels("duplicate").inc()
            return
        self.buffer.append((entry, group))

    async def _drop_stale(self) -> None:
        limit = self.settings.max_staleness
        stale = [(e, g) for e, g in self.buffer if self.version - g.weight_version > limit]
        if not stale:
            return
        self.buffer = [(e, g) for e, g in self.buffer if self.version - g.weight_version <= limit]
        self.state.dropped_stale += len(stale)
        await self.redis.hincrby(self.keys.state("trainer"), "dropped_stale", len(stale))  # type: ignore[misc]
        await self.reader.ack(*[e.id for e, _ in stale])
        GROUPS.labels("dropped_stale").inc(len(stale))
        log.info("dropped %d stale groups (weight versions %s; trainer at %d, max_staleness %d)", len(stale),
                 sorted({g.weight_version for _, g in stale}), self.version, limit)  # fmt: skip

    async def step(self) -> None:
        """One optimizer step on the oldest buffered groups, then checkpoint, ack, push."""
        cfg = self.settings
        self.in_flight, self.buffer = self.buffer[: cfg.prompts_per_step], self.buffer[cfg.prompts_per_step :]
        groups = [g for _, g in self.in_flight]
        started = time.monotonic()
        stats = await asyncio.to_thread(self._train, groups)
        ids = [g.group_id for g in groups]
        after = checkpoint.TrainerState(step=self.version + 1, trained_group_ids=self.state.trained_group_ids + ids,
                                        dropped_stale=self.state.dropped_stale)  # fmt: skip
        async with self._weights_lock:  # the engine watcher must not see a half-finished version
            path = await asyncio.to_thread(checkpoint.save, self.ckpt_dir, self.model, self.tokenizer,
                                           self.optimizer, after, self.record, cfg.keep_checkpoints)  # fmt: skip
            self.state = after
            self.trained.update(ids)
        self._dirty = True
        await self.reader.ack(*[e.id for e, _ in self.in_flight])  # only now: the checkpoint holds their effect
        self.in_flight = []
        stats["step_seconds"] = time.monotonic() - started
        self.last = stats
        STEPS.inc()
        GROUPS.labels("trained").inc(len(groups))
        VERSION.set(self.version)
        LOSS.set(stats["loss"])
        STEP_SECONDS.observe(stats["step_seconds"])
        log.info("step %d: loss %.4f, reward hinted %.3f unhinted %.3f, ratio mean %.4f max %.4f, clipped %.3f, "
                 "grad norm %.3f, %d tokens, %.1fs", self.version, stats["loss"], stats["reward_hinted"],
                 stats["reward_unhinted"], stats["ratio_mean"], stats["ratio_max"], stats["clip_frac"],
                 stats["grad_norm"], stats["tokens"], stats["step_seconds"])  # fmt: skip
        async with self._weights_lock:
            await self.push(path, self.version)
        await self.publish_state()
        await publish(self.redis, self.keys.events, WeightsUpdated(weight_version=self.version, path=str(path)),
                      self.settings.streams)  # fmt: skip

    def _train(self, groups: list[ScoredGroup]) -> dict[str, float]:
        cfg = self.settings
        rows = rows_from_groups(groups, scale_by_std=cfg.scale_adv_by_std, mask_truncated=cfg.mask_truncated)
        tokens = sum(len(r.old_logprobs) for r in rows if r.trainable)
        normalizer = {"constant": cfg.prompts_per_step * cfg.group_size, "token_mean": max(tokens, 1),
                      "seq_mean": max(sum(r.trainable for r in rows), 1)}[cfg.loss_agg]  # fmt: skip
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = {"loss": 0.0, "tokens": 0.0, "ratio_sum": 0.0, "ratio_max": 0.0, "clipped": 0.0, "diff": 0.0}
        for chunk in _chunks(rows, cfg.micro_batch):
            b = collate(chunk, self.pad_id)
            dev = cfg.device
            new = token_logprobs(self.model, b.input_ids.to(dev), b.attention_mask.to(dev), b.temperature.to(dev))
            loss, st = policy_loss(new, b.old_logprobs.to(dev), b.advantages.to(dev), b.loss_mask.to(dev),
                                   clip_eps=cfg.clip_eps, agg=cfg.loss_agg, normalizer=float(normalizer))  # fmt: skip
            loss.backward()
            total["loss"] += float(loss.detach())
            total["tokens"] += st.tokens
            total["ratio_sum"] += st.ratio_sum
            total["ratio_max"] = max(total["ratio_max"], st.ratio_max)
            total["clipped"] += st.clipped
            total["diff"] += st.abs_logp_diff_sum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.model.eval()
        n_tok = max(total["tokens"], 1.0)
        by_variant = {v: [r for g in groups if g.variant is v for r in g.rewards] for v in Variant}
        return {
            "loss": total["loss"],
            "tokens": total["tokens"],
            "ratio_mean": total["ratio_sum"] / n_tok,
            "ratio_max": total["ratio_max"],
            "clip_frac": total["clipped"] / n_tok,
            "logp_abs_diff_mean": total["diff"] / n_tok,
            "grad_norm": float(grad_norm),
            "groups": float(len(groups)),
            **{f"reward_{v.value}": (sum(r) / len(r) if r else float("nan")) for v, r in by_variant.items()},
        }

    async def push(self, path: Path, version: int) -> bool:
        """Tell the engine to load ``path`` as ``version``; False (logged) if it fails."""
        if self.engine is None:
            return False
        try:
            await self.engine.update_weights_from_disk(str(path), version)
        except EngineError as exc:
            log.warning("pushing weights v%d to the engine failed (will retry): %s", version, exc)
            return False
        return True

    async def publish_state(self) -> None:
        """The state the rollout scheduler and /v1/status read; retried each pass until it lands."""
        fields: dict[str, Any] = {
            "version": self.version,
            "step": self.version,
            "buffered": len(self.buffer),
            "dropped_stale": self.state.dropped_stale,
            "max_staleness": self.settings.max_staleness,
            "updated_at": time.time(),
        }
        fields.update({k: v for k, v in self.last.items() if v == v})  # NaN-free
        await self.redis.hset(self.keys.state("trainer"), mapping=fields)  # type: ignore[misc]
        self._dirty = False

    async def _renew_leases(self, stop: asyncio.Event) -> None:
        period = self.settings.streams.lease_ms / 3000
        while not stop.is_set():
            await asyncio.sleep(period)
            with contextlib.suppress(RedisError):
                await self.reader.renew(*[e.id for e, _ in self.buffer + self.in_flight])

    async def _watch_engine(self, stop: asyncio.Event) -> None:
        """Re-push the latest weights whenever the engine serves an older version."""
        if self.engine is None:
            return
        while not stop.is_set():
            with contextlib.suppress(EngineError):
                async with self._weights_lock:
                    served = await self.engine.weight_version()
                    newest = checkpoint.latest(self.ckpt_dir)
                    step = checkpoint.load_state(newest).step if newest is not None else 0
                    if newest is not None and served < step:
                        log.warning("engine serves v%d, the latest checkpoint is v%d: re-pushing %s", served, step,
                                    newest)  # fmt: skip
                        await self.push(newest, step)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.repush_interval_s)
