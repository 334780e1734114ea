"""The rollout scheduler: per step, sample the planned groups and publish them.

    step s = 1, 2, ...:
        wait until s <= trainer_version + 1 + max_staleness     (never run too far ahead)
        wait until the engine serves at least s - 1 - max_staleness
        plan prompts_per_step groups (planner.py: hinted/unhinted 1:1 for hinted problems)
        for each group (several at once): /generate with n = group_size -> RawGroup
        publish every RawGroup to pope:rollouts

With max_staleness 0 this is synchronous, on-policy GRPO: step s is sampled only after
the trainer finished step s - 1 and the engine serves its weights. The scheduler's own
progress (step, groups published) is kept in Redis, so a restart carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import defaultdict, deque
from typing import Any

from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.engine_client import EngineClient, EngineError, SamplingParams
from services.common.keys import TRAINERS, VERIFIERS, Keys
from services.common.messages import Problem, RawGroup, Sample, Variant
from services.common.streams import group_info, publish
from services.rollout.planner import Planner
from services.rollout.prompts import prompt_ids, user_message
from services.rollout.settings import RolloutSettings
from services.rollout.store import ProblemStore

log = logging.getLogger(__name__)

PUBLISHED = Counter("pope_rollout_groups_total", "Raw groups published", ["variant"])
STEP = Gauge("pope_rollout_step", "The step the scheduler is generating for")
WAITING = Gauge("pope_rollout_waiting", "1 while the scheduler waits (trainer, engine or problems)")


def group_id(step: int, problem_id: str, variant: Variant, salt: str) -> str:
    """A planned group's identity: its step, problem, variant, repeat within the step and
    top-up index (``salt``), and nothing random, so the same group planned again (a restart
    in the middle of a step) is a duplicate by id, which every consumer skips."""
    return f"{step}-{problem_id}-{variant.value}" + (f"/{salt}" if salt else "")


def repeat_salts(plan: list[tuple[Problem, Variant]]) -> list[str]:
    """A seed salt per planned group: none for the first group of a (problem, variant) in a
    step, ``#k`` for its k-th repeat, so repeats (a hinted-only mix plans each problem's
    pair as two hinted groups) are independent samples, not copies of one group."""
    seen: defaultdict[tuple[str, Variant], int] = defaultdict(int)
    salts = []
    for problem, variant in plan:
        k = seen[problem.id, variant]
        seen[problem.id, variant] += 1
        salts.append(f"#{k}" if k else "")
    return salts


class Scheduler:
    def __init__(
        self, settings: RolloutSettings, redis: Redis, engine: EngineClient, store: ProblemStore, tokenizer: Any
    ) -> None:
        self.settings, self.redis, self.engine, self.store, self.tokenizer = settings, redis, engine, store, tokenizer
        self.keys = Keys(settings.key_prefix)
        self.planner = Planner(settings.hinted_fraction, settings.include_easy, settings.seed)
        self.step = 0
        self.waiting_for = "starting"
        self.published: deque[float] = deque(maxlen=10_000)  # publish times, for rates
        self.top_ups = 0  # top-ups so far (kept in Redis): salts their ids and seeds, so they differ
        self._warned_lag = False

    async def trainer_version(self) -> int:
        raw = await self.redis.hget(self.keys.state("trainer"), "version")  # type: ignore[misc]
        return int(float(raw)) if raw is not None else 0

    async def run(self, stop: asyncio.Event) -> None:
        saved = await self.redis.hmget(self.keys.state("rollout"), ["step", "planner", "top_ups"])  # type: ignore[misc]
        self.step = max(int(float(saved[0])) if saved[0] else 0, await self.trainer_version())
        if saved[1]:
            self.planner.restore(json.loads(saved[1]))
        self.top_ups = int(saved[2]) if saved[2] else 0
        while not stop.is_set():
            try:
                if await self._ready_for(self.step + 1):
                    await self._generate_step(self.step + 1)
                    continue
                if need := await self._starving():
                    await self._generate_step(self.step, need, top_up=True)
                    continue
            except EngineError as exc:
                self.waiting_for = "the engine (unreachable or still loading)"
                log.warning("scheduler: %s; retrying", exc)
            except RedisError as exc:
                self.waiting_for = "redis (unreachable)"
                log.warning("scheduler: %s; retrying", exc)
            WAITING.set(1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.poll_interval_s)
        WAITING.set(0)

    async def lag(self) -> int:
        """The staleness bound in force: the stricter of this service's and the trainer's, so
        a mismatched config wastes no compute on groups the trainer would drop."""
        theirs = await self.redis.hget(self.keys.state("trainer"), "max_staleness")  # type: ignore[misc]
        lag = self.settings.max_staleness
        theirs = int(float(theirs)) if theirs is not None else None
        if theirs is not None and theirs != lag:
            if not self._warned_lag:
                log.error(
                    "rollout.max_staleness=%d but trainer.max_staleness=%d: using %d (set it once, in "
                    "the config's shared section)",
                    lag,
                    theirs,
                    min(lag, theirs),
                )
                self._warned_lag = True
            lag = min(lag, theirs)
        return lag

    async def _ready_for(self, step: int) -> bool:
        lag = await self.lag()
        trainer = await self.trainer_version()
        if step > trainer + 1 + lag:
            self.waiting_for = f"trainer (at v{trainer}; step {step} may run at most {lag} ahead)"
            return False
        engine = await self.engine.weight_version()
        if engine < step - 1 - lag:
            self.waiting_for = f"engine weights (serves v{engine}, step {step} needs >= v{step - 1 - lag})"
            return False
        if await self.store.count() == 0:
            self.waiting_for = "problems (POST /v1/problems)"
            return False
        if step == 1 and not await self._start_evaluated():
            self.waiting_for = "the evaluation of the start weights (rollout.evaluation.every_steps)"
            return False
        self.waiting_for = ""
        WAITING.set(0)
        return True

    async def _start_evaluated(self) -> bool:
        """Whether training may begin: with periodic evaluation on and problems to evaluate,
        only once the start weights (v0) are evaluated; a fast first step would otherwise
        move the engine on before the evaluator samples them, and the run has no baseline."""
        cfg = self.settings.evaluation
        if cfg.every_steps == 0 or await self.redis.hexists(self.keys.state("eval"), "weight_version"):  # type: ignore[misc]
            return True
        return not any(p.split == cfg.split for p in await self.store.all())

    async def _starving(self) -> int:
        """Groups the trainer still needs for its next step when none are on the way.

        Groups can be lost on purpose (dead-lettered by the verifier, dropped as stale by
        the trainer). Without a top-up, a trainer short of a full step would wait for
        groups while this scheduler waits for the trainer: a deadlock. The pipeline is
        "drained" when every raw group is scored and every scored group is in the
        trainer's buffer (its pending count equals the buffer it reports).
        """
        state = await self.redis.hgetall(self.keys.state("trainer"))  # type: ignore[misc]
        if b"buffered" not in state:
            return 0  # no trainer has reported yet
        need = self.settings.prompts_per_step - int(float(state[b"buffered"]))
        if need <= 0:
            return 0
        rollouts = await group_info(self.redis, self.keys.rollouts, VERIFIERS)
        scored = await group_info(self.redis, self.keys.scored, TRAINERS)
        drained = (
            rollouts is not None
            and rollouts["pending"] == 0
            and rollouts["lag"] == 0
            and scored is not None
            and scored["lag"] == 0
            and scored["pending"] == int(float(state[b"buffered"]))
        )
        if not drained:
            return 0
        # Top-up groups must not be stale on arrival: the engine must serve recent weights.
        version = int(float(state.get(b"version", b"0")))
        if await self.engine.weight_version() < version - await self.lag():
            self.waiting_for = "the engine to load the trainer's weights (the trainer re-pushes them)"
            return 0
        log.warning(
            "the trainer needs %d more groups for step %d and none are on the way (some were "
            "dead-lettered or dropped as stale): topping up",
            need,
            self.step,
        )
        return need

    async def _generate_step(self, step: int, n_groups: int | None = None, top_up: bool = False) -> None:
        STEP.set(step)
        plan = self.planner.plan(await self.store.all(), n_groups or self.settings.prompts_per_step)
        if not plan:
            self.waiting_for = "train problems (none are eligible: split 'train', not excluded)"
            return
        started = time.monotonic()
        limit = asyncio.Semaphore(self.settings.max_concurrent_groups)
        salt = ""
        if top_up:
            # Counted before any of its groups is published, so a top-up planned again after a
            # restart gets new ids: its first groups may be trained already.
            self.top_ups += 1
            await self.redis.hset(self.keys.state("rollout"), "top_ups", str(self.top_ups))  # type: ignore[misc]
            salt = f"top-up-{self.top_ups}"

        async def one(problem: Problem, variant: Variant, salt: str) -> None:
            async with limit:
                group = await self.sample_group(problem, variant, step, salt)
                await publish(self.redis, self.keys.rollouts, group, self.settings.streams)
                PUBLISHED.labels(variant.value).inc()
                self.published.append(time.time())

        try:
            async with asyncio.TaskGroup() as tg:  # one failure cancels the rest of the step
                for (p, v), repeat in zip(plan, repeat_salts(plan), strict=True):
                    tg.create_task(one(p, v, salt + repeat))
        except* (EngineError, RedisError) as group_error:
            raise group_error.exceptions[0] from None
        if top_up:
            return
        self.step = step
        await self.redis.hset(
            self.keys.state("rollout"),
            mapping={  # type: ignore[misc]
                "step": step,
                "updated_at": time.time(),
                "last_step_seconds": time.monotonic() - started,
                "planner": json.dumps(self.planner.state()),
            },
        )
        hinted = sum(v is Variant.HINTED for _, v in plan)
        log.info(
            "step %d: published %d groups (%d hinted, %d unhinted) in %.1fs",
            step,
            len(plan),
            hinted,
            len(plan) - hinted,
            time.monotonic() - started,
        )

    async def sample_group(self, problem: Problem, variant: Variant, step: int, salt: str = "") -> RawGroup:
        """G samples of one variant of one problem, as a RawGroup."""
        cfg = self.settings
        text = user_message(problem, variant, cfg.prompt_template)
        ids = prompt_ids(self.tokenizer, text)
        # Reproducible per (seed, step, problem, variant), distinct across them.
        seed = random.Random(f"{cfg.seed}:{step}:{problem.id}:{variant.value}{salt}").randrange(2**31)
        gid = group_id(step, problem.id, variant, salt)
        params = SamplingParams(
            n=cfg.group_size,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            sampling_seed=seed,
        )
        outs = await self.engine.generate([ids], params, rid=gid)
        samples = [
            Sample(
                problem_id=problem.id,
                variant=variant,
                prompt_ids=ids,
                completion_ids=o.output_ids,
                logprobs=o.logprobs,
                finish_reason=o.finish_reason,
                weight_version=o.weight_version,
                text=o.text,
            )
            for o in outs
        ]
        return RawGroup(
            group_id=gid,
            problem_id=problem.id,
            variant=variant,
            prompt=text,
            answer=problem.answer,
            samples=samples,
            weight_version=min(s.weight_version for s in samples),
            step=step,
            temperature=cfg.temperature,
            template_version=cfg.prompt_template.version,
        )

    def rate_per_min(self) -> float:
        cutoff = time.time() - 60
        return float(sum(t >= cutoff for t in self.published))
