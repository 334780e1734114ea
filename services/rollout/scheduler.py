"""The rollout scheduler: per step, sample the planned groups and publish them.

    step s = 1, 2, ...:
        wait until s <= trainer_version + 1 + max_staleness     (never run too far ahead)
        wait until the engine serves at least s - 1 - max_staleness
        plan prompts_per_step groups (planner.py: hinted/unhinted 1:1 for hinted problems)
        write the plan to the plan log (planlog.py; fsynced) before any group is out
        for each group (several at once): /generate of group_size rows -> RawGroup
        publish every RawGroup to pope:rollouts; then mark the plan published

With max_staleness 0 this is synchronous, on-policy GRPO: step s is sampled only after
the trainer finished step s - 1 and the engine serves its weights. A group's id is its
identity (step, problem, variant, repeat, top-up), so a plan cut short by a crash is
published again from the log under the same ids, and what was already out is a duplicate
by id downstream. A group the engine aborted a sample of is sampled again, never sent.

Lineages (services.common.messages.Lineage): when the trainer resumes behind versions it
had pushed, it starts a new lineage at the resumed step. The scheduler follows: an
unfinished plan of the old lineage is closed (its unsent groups recorded as skipped), the
step goes back to the lineage's ``forked_at`` (the rollout position of the checkpoint it
resumed), and the steps after it are planned again under ids that carry the lineage. An
engine serving a lost lineage's weights is waited out (the trainer reloads it), and a group
sampled by them is sampled again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict, deque
from typing import Any

from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.engine_client import EngineError, SamplingParams
from services.common.keys import TRAINERS, VERIFIERS, Keys
from services.common.messages import FinishReason, Lineage, Problem, RawGroup, Sample, Variant, version_name
from services.common.run import claim_run, read_control, shape_of
from services.common.streams import group_info, publish
from services.rollout.engines import Engines
from services.rollout.planlog import PLAN_LOG, Plan, PlanLog, PlannedGroup, load_planner_state, save_planner_state
from services.rollout.planner import Planner
from services.rollout.prompts import prompt_ids, user_message
from services.rollout.settings import RolloutSettings
from services.rollout.store import ProblemStore

log_ = logging.getLogger(__name__)

PUBLISHED = Counter("pope_rollout_groups_total", "Raw groups published", ["variant"])
STEP = Gauge("pope_rollout_step", "The step the scheduler is generating for")
ABORTED = Counter(
    "pope_rollout_groups_resampled_total",
    "Groups sampled again: the engine aborted a sample, or answered with weights too old for the step",
)
WAITING = Gauge("pope_rollout_waiting", "1 while the scheduler waits (trainer, engine or problems)")


def group_id(step: int, problem_id: str, variant: Variant, salt: str, lineage: int = 0) -> str:
    """A planned group's identity: its lineage, step, problem, variant, repeat within the
    step and top-up index (``salt``), and nothing random, so the same group planned again
    (a restart in the middle of a step) is a duplicate by id, which every consumer skips,
    while step 11 planned again in a new lineage is another group."""
    return f"{version_name(step, lineage)}-{problem_id}-{variant.value}" + (f"/{salt}" if salt else "")


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


class GroupAborted(RuntimeError):
    """The engine aborted a sample of the group (paused, aborted, restarting)."""


class LineageChanged(RuntimeError):
    """The trainer started a new lineage while a plan of the old one was being published:
    the plan stops (``run`` then closes it and rewinds, ``follow_lineage``)."""


class Scheduler:
    def __init__(
        self, settings: RolloutSettings, redis: Redis, engines: Engines, store: ProblemStore, tokenizer: Any
    ) -> None:
        self.settings, self.redis, self.engines, self.store, self.tokenizer = settings, redis, engines, store, tokenizer
        self.engine = engines.client
        self.keys = Keys(settings.key_prefix)
        self.planner = Planner(settings.hinted_fraction, settings.include_easy, settings.seed)
        self.step = 0
        self.lineage = Lineage()  # the trainer's, as last read
        self.plan_lineage = 0  # the lineage this scheduler plans under
        self.waiting_for = "starting"
        self.published: deque[float] = deque(maxlen=10_000)  # publish times, for rates
        self._log: PlanLog | None = None
        self._sent: set[str] = set()  # groups of the current plan this process published

    @property
    def log(self) -> PlanLog:
        """The plan log (opened on first use; PlanLogError for another run's or format's)."""
        if self._log is None:
            self._log = PlanLog.open(self.settings.archive_dir / PLAN_LOG, self.settings.key_prefix)
        return self._log

    async def trainer_version(self) -> int:
        control = await read_control(self.redis, self.keys)
        if control is not None:
            self.lineage = control.lineage
        return control.version if control else 0

    async def follow_lineage(self) -> None:
        """If the trainer has started a lineage newer than the one this scheduler plans
        under: close the old lineage's unfinished plan (its unsent groups recorded as
        skipped), and go back to the new lineage's rollout position."""
        control = await read_control(self.redis, self.keys)
        if control is None or control.lineage.id <= self.plan_lineage:
            return
        self.lineage = control.lineage
        if (cut := self.log.unfinished) is not None:
            unsent = {}
            for g in cut.groups:
                if g.group_id not in self._sent and not await self.redis.exists(self.keys.done(VERIFIERS, g.group_id)):
                    unsent[g.group_id] = f"its lineage {cut.lineage} was lost (the trainer rewound)"
            await asyncio.to_thread(self.log.append_published, cut, unsent)
            self._sent.clear()
        log_.warning(
            "the trainer resumed at step %d as lineage %d (lineage %d went further and was lost): "
            "planning again from step %d (was at %d)",
            control.lineage.forked_at,
            control.lineage.id,
            self.plan_lineage,
            max(control.lineage.forked_at, control.version) + 1,
            self.step,
        )
        # The checkpoint's rollout position, or the trainer's step if it has gone on since
        # (on groups of the old lineage that its weights still hold).
        self.plan_lineage, self.step = control.lineage.id, max(control.lineage.forked_at, control.version)

    async def restore(self) -> None:
        """Where the last run of this scheduler stopped: its plan log and planner position
        (the trainer's version, if ahead, when the log was lost with the rollout's disk).
        Joins the run first: RunMismatch if its shape or format is not this service's."""
        await claim_run(self.redis, self.keys, shape_of(self.settings, "rollout"))
        log = await asyncio.to_thread(lambda: self.log)
        saved = await asyncio.to_thread(load_planner_state, self.settings.archive_dir)
        if saved is not None:
            seq, state = saved
            self.planner.restore(state)
            if log.last is not None and seq < log.last.seq:
                log_.warning("the planner's position is from plan %d, the log's last plan is %d", seq, log.last.seq)
        cut = log.unfinished  # a step's own plan cut short is that step not yet done
        self.plan_lineage = log.lineage
        self.step = max(log.last_step - 1 if cut is not None and cut.top_up == 0 else log.last_step, 0)
        trainer = await self.trainer_version()
        if self.lineage.id == self.plan_lineage:  # else follow_lineage moves to the trainer's
            self.step = max(self.step, trainer)
        if log.unfinished is not None:
            log_.warning(
                "plan %d (step %d%s) was cut short: publishing its groups again under the same ids",
                log.unfinished.seq,
                log.unfinished.step,
                f", top-up {log.unfinished.top_up}" if log.unfinished.top_up else "",
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Schedule until ``stop``; engine and Redis troubles are waited out. A run record
        that does not match this service's (RunMismatch) ends it, as does a bad plan log."""
        restored = False
        while not stop.is_set():
            try:
                if not restored:
                    await self.restore()
                    restored = True
                await self.follow_lineage()
                if (cut := self.log.unfinished) is not None:  # a restart or a failure mid-plan
                    await self._publish(cut)
                    continue
                if await self._ready_for(self.step + 1) and await self._generate_step(self.step + 1):
                    continue
                if (need := await self._starving()) and await self._generate_step(self.step, need, top_up=True):
                    continue
            except LineageChanged as exc:
                log_.warning("scheduler: %s", exc)
                continue
            except EngineError as exc:
                self.waiting_for = "the engine (unreachable or still loading)"
                log_.warning("scheduler: %s; retrying", exc)
            except RedisError as exc:
                self.waiting_for = "redis (unreachable)"
                log_.warning("scheduler: %s; retrying", exc)
            WAITING.set(1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.poll_interval_s)
        WAITING.set(0)

    async def _ready_for(self, step: int) -> bool:
        lag = self.settings.max_staleness  # the run record holds every service to the same
        trainer = await self.trainer_version()
        if step > trainer + 1 + lag:
            self.waiting_for = f"trainer (at v{trainer}; step {step} may run at most {lag} ahead)"
            return False
        engine, lineage = await self.engines.served_version(self.lineage)
        if not self.lineage.holds(engine, lineage):
            self.waiting_for = (
                f"the engine to be reloaded (it serves v{version_name(engine, lineage)}, which a rewind lost)"
            )
            return False
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

        Groups can be lost on purpose (dead-lettered by the verifier, dropped as stale or
        aborted by the trainer). Without a top-up, a trainer short of a full step would
        wait for groups while this scheduler waits for the trainer: a deadlock. The
        pipeline is "drained" when every raw group is delivered to a verifier and scored,
        and every scored group is delivered to the trainer and in its buffer (its pending
        count equals the buffer it reports). Delivery is judged by entry ids, not by
        XINFO's lag, which a Redis restarted from its AOF can leave wrong for good.
        """
        control = await read_control(self.redis, self.keys)
        if control is None or self.step == 0:
            return 0  # no trainer has reported yet, or no step was planned: nothing is missing
        need = self.settings.prompts_per_step - control.buffered
        if need <= 0 or (control.max_steps is not None and control.version >= control.max_steps):
            return 0
        rollouts = await group_info(self.redis, self.keys.rollouts, VERIFIERS)
        scored = await group_info(self.redis, self.keys.scored, TRAINERS)
        drained = (
            rollouts is not None
            and rollouts["pending"] == 0
            and rollouts["lag"] == 0
            and scored is not None
            and scored["lag"] == 0
            and scored["pending"] == control.buffered + control.awaiting_checkpoint
        )
        if not drained:
            return 0
        # Top-up groups must not be stale on arrival: the engine must serve recent weights.
        engine, lineage = await self.engines.served_version(control.lineage)
        if not control.lineage.holds(engine, lineage) or engine < control.version - self.settings.max_staleness:
            self.waiting_for = "the engine to load the trainer's weights (the trainer re-pushes them)"
            return 0
        log_.warning(
            "the trainer needs %d more groups for step %d and none are on the way (some were "
            "dead-lettered or dropped): topping up",
            need,
            self.step,
        )
        return need

    async def _generate_step(self, step: int, n_groups: int | None = None, top_up: bool = False) -> bool:
        """Plan step ``step`` (or a top-up of ``n_groups`` for it), log the plan, publish it;
        False when there was nothing to plan (no eligible problem)."""
        STEP.set(step)
        chosen = self.planner.plan(await self.store.all(), n_groups or self.settings.prompts_per_step)
        if not chosen:
            self.waiting_for = "train problems (none are eligible: split 'train', not excluded)"
            return False
        log = self.log
        index = log.top_ups + 1 if top_up else 0
        prefix = f"top-up-{index}" if top_up else ""
        groups = [
            PlannedGroup(
                group_id=group_id(step, p.id, v, prefix + repeat, self.plan_lineage),
                problem_id=p.id,
                variant=v,
                seed=self.seed_for(step, p.id, v, prefix + repeat),
                salt=prefix + repeat,
            )
            for (p, v), repeat in zip(chosen, repeat_salts(chosen), strict=True)
        ]
        plan = Plan(seq=log.next_seq(), step=step, top_up=index, lineage=self.plan_lineage, groups=groups)
        # Durable before any group is out: a restart publishes exactly this plan again.
        await asyncio.to_thread(log.append_plan, plan)
        await asyncio.to_thread(save_planner_state, self.settings.archive_dir, plan.seq, self.planner.state())
        await self._publish(plan)
        return True

    async def _publish(self, plan: Plan) -> None:
        """Sample and publish every group of ``plan`` not already scored, then mark it done."""
        started = time.monotonic()
        problems = {p.id: p for p in await self.store.all()}
        limit = asyncio.Semaphore(self.settings.max_concurrent_groups)
        skipped: dict[str, str] = {}

        async def one(planned: PlannedGroup) -> None:
            problem = problems.get(planned.problem_id)
            if problem is None:
                skipped[planned.group_id] = "its problem was deleted"
                return
            if planned.group_id in self._sent or await self.redis.exists(self.keys.done(VERIFIERS, planned.group_id)):
                return  # published before the failure that cut the plan short, or scored before a restart
            async with limit:
                group = await self.sample_until_whole(problem, planned, plan.step)
                await publish(self.redis, self.keys.rollouts, group, self.settings.streams)
                self._sent.add(planned.group_id)
                PUBLISHED.labels(planned.variant.value).inc()
                self.published.append(time.time())

        try:
            async with asyncio.TaskGroup() as tg:  # one failure cancels the rest of the plan
                for planned in plan.groups:
                    tg.create_task(one(planned))
        except* (EngineError, RedisError, LineageChanged) as group_error:
            raise group_error.exceptions[0] from None
        await asyncio.to_thread(self.log.append_published, plan, skipped)
        self._sent.clear()
        for gid, why in skipped.items():
            log_.error("group %s of plan %d was not published: %s", gid, plan.seq, why)
        if plan.top_up == 0:
            self.step = max(self.step, plan.step)
        await self.redis.hset(
            self.keys.state("rollout"),
            mapping={  # type: ignore[misc]
                "step": self.step,
                "top_ups": self.log.top_ups,
                "updated_at": time.time(),
                "last_step_seconds": time.monotonic() - started,
            },
        )
        hinted = sum(g.variant is Variant.HINTED for g in plan.groups)
        log_.info(
            "%s %d: published %d groups (%d hinted, %d unhinted) in %.1fs",
            f"top-up {plan.top_up} of step" if plan.top_up else "step",
            plan.step,
            len(plan.groups) - len(skipped),
            hinted,
            len(plan.groups) - hinted,
            time.monotonic() - started,
        )

    def seed_for(self, step: int, problem_id: str, variant: Variant, salt: str) -> int:
        """Reproducible per (seed, lineage, step, problem, variant, salt), distinct across them."""
        at = version_name(step, self.plan_lineage)
        return random.Random(f"{self.settings.seed}:{at}:{problem_id}:{variant.value}{salt}").randrange(2**31)

    async def sample_until_whole(self, problem: Problem, planned: PlannedGroup, step: int) -> RawGroup:
        """The planned group, sampled again (same id and seed) while the engine aborts any of
        its samples (an aborted sample is no sample, and is never trained on) or answers with
        weights older than the step allows (an engine restarted mid-step, before the trainer
        re-pushed its weights)."""
        delay = 0.5
        while True:
            try:
                group = await self.sample_group(problem, planned.variant, step, planned.salt)
                oldest = step - 1 - self.settings.max_staleness
                if not await self._held(group):
                    raise GroupAborted(f"group {planned.group_id} was sampled by weights a rewind lost")
                if group.weight_version >= oldest:
                    return group
                await self.trainer_version()  # a rewind may be why the engine is behind
                # The engine restarted mid-step and serves its start-up weights (the trainer
                # re-pushes): a group of them would only be dropped as stale.
                raise GroupAborted(
                    f"group {planned.group_id} was sampled at v{group.weight_version}; step {step} needs >= v{oldest}"
                )
            except GroupAborted as exc:
                if self.lineage.id > self.plan_lineage:  # as read by _held or _ready_for just now
                    raise LineageChanged(
                        f"the trainer began lineage {self.lineage.id} while step {step} of lineage "
                        f"{self.plan_lineage} was being published: stopping that plan"
                    ) from exc
                ABORTED.inc()
                self.waiting_for = f"the engine (paused, restarting or behind the trainer: {exc})"
                log_.warning("%s; sampling it again in %.1fs", exc, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 10.0)

    async def _held(self, group: RawGroup) -> bool:
        """Whether the trainer's lineage holds the weights of every sample (read again from
        the control state once before saying no: the trainer may have moved on)."""
        for fresh in (False, True):
            if fresh:
                await self.trainer_version()
            if all(self.lineage.holds(*v) for s in group.samples for v in s.versions):
                return True
        return False

    async def sample_group(self, problem: Problem, variant: Variant, step: int, salt: str = "") -> RawGroup:
        """G samples of one variant of one problem, as a RawGroup; GroupAborted if the
        engine aborted any of them. The client sends the G copies as G rows seeded
        ``seed + i`` (``EngineClient.generate_payload``), so they differ on SGLang with and
        without deterministic inference; with it on (the CPU demo's and tests' engines) a
        group is reproducible from its seed."""
        cfg = self.settings
        text = user_message(problem, variant, cfg.prompt_template)
        ids = prompt_ids(self.tokenizer, text)
        gid = group_id(step, problem.id, variant, salt, self.plan_lineage)
        params = SamplingParams(
            n=cfg.group_size,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            sampling_seed=self.seed_for(step, problem.id, variant, salt),
        )
        outs = await self.engine.generate([ids], params, rid=gid)
        if aborted := sum(o.finish_reason is FinishReason.ABORT for o in outs):
            raise GroupAborted(f"the engine aborted {aborted} of the {len(outs)} samples of group {gid}")
        samples = [
            Sample(
                problem_id=problem.id,
                variant=variant,
                prompt_ids=ids,
                completion_ids=o.output_ids,
                logprobs=o.logprobs,
                finish_reason=o.finish_reason,
                weight_version=o.weight_version,
                lineage=o.lineage,
                text=o.text,
                version_spans=spans if len(spans := o.version_spans) > 1 else [],
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
            lineage=self.plan_lineage,
            hint=problem.hint if variant is Variant.HINTED else None,
        )

    def rate_per_min(self) -> float:
        cutoff = time.time() - 60
        return float(sum(t >= cutoff for t in self.published))
