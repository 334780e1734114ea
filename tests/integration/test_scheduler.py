"""The rollout scheduler against a real engine and Redis: the staleness bound, the POPE
mix in published groups, the top-up that keeps a short trainer from deadlocking, and
groups of distinct samples with and without deterministic inference."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from transformers import AutoTokenizer

from services.common.engine_client import EngineClient
from services.common.keys import TRAINERS, VERIFIERS, Keys
from services.common.messages import FinishReason, Lineage, Problem, RawGroup, TrainerControl, Variant, decode
from services.common.run import write_control
from services.common.streams import DATA, DeliveryPolicy
from services.rollout.engines import Engines
from services.rollout.planlog import PlannedGroup
from services.rollout.scheduler import Scheduler, group_id
from services.rollout.settings import RolloutSettings
from services.rollout.store import ProblemStore
from tests.conftest import running_engine

PROBLEMS = [
    Problem(id="h", prompt="Compute 2+2.", answer="4", hint="We add:"),
    Problem(id="u", prompt="3*5?", answer="15"),
]


async def make(
    aredis: Redis, keys: Keys, engine: EngineClient, tiny_model: Path, tmp_path: Path, **kw: object
) -> Scheduler:
    sizes: dict[str, object] = {"group_size": 2, "prompts_per_step": 4, "max_new_tokens": 4}
    settings = RolloutSettings(
        key_prefix=keys.prefix,
        archive_dir=tmp_path / "rollouts",
        streams=DeliveryPolicy(block_ms=50),
        **(sizes | kw),
    )  # type: ignore[arg-type]
    store = ProblemStore(aredis, keys)
    await store.put_many(PROBLEMS)
    engines = Engines(settings, aredis, client=engine)
    return Scheduler(settings, aredis, engines, store, AutoTokenizer.from_pretrained(str(tiny_model)))


async def trainer_at(aredis: Redis, keys: Keys, version: int, buffered: int = 0) -> None:
    """The trainer's control state, as the trainer writes it."""
    await write_control(aredis, keys, TrainerControl(version=version, buffered=buffered, instance="test"))


def publish_dies_after(n: int) -> Any:
    """``streams.publish`` as the scheduler calls it, failing from the (n + 1)-th call on as
    a rollout service that loses Redis mid-step does."""
    from services.rollout import scheduler

    real_publish, calls = scheduler.publish, [0]

    async def publish(*args: Any, **kwargs: Any) -> str:
        calls[0] += 1
        if calls[0] > n:
            raise RedisConnectionError("injected: the rollout service loses Redis mid-step")
        return await real_publish(*args, **kwargs)

    return publish


async def published(aredis: Redis, keys: Keys) -> list[RawGroup]:
    return [decode(RawGroup, f[DATA]) for _i, f in await aredis.xrange(keys.rollouts)]


async def test_never_more_than_max_staleness_ahead_and_the_pope_mix(
    aredis: Redis, keys: Keys, engine_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    async with EngineClient(engine_url) as engine:
        s = await make(aredis, keys, engine, tiny_model, tmp_path, max_staleness=1)
        await trainer_at(aredis, keys, 0)
        assert await s._ready_for(1) and await s._ready_for(2)  # up to one version ahead of v0
        await s._generate_step(1)
        await s._generate_step(2)
        assert not await s._ready_for(3) and "trainer" in s.waiting_for
        await trainer_at(aredis, keys, 1)
        # The trainer moved on, but the engine still serves v0: step 3 needs at least v1.
        assert not await s._ready_for(3) and "engine" in s.waiting_for
    groups = await published(aredis, keys)
    assert len(groups) == 8 and {g.step for g in groups} == {1, 2}
    hinted = [g for g in groups if g.variant is Variant.HINTED]
    assert hinted and all(g.problem_id == "h" and "We add:" in g.prompt for g in hinted)
    unhinted_h = sum(g.problem_id == "h" and g.variant is Variant.UNHINTED for g in groups)
    assert abs(unhinted_h - len(hinted)) <= 1  # 1:1, up to a pair cut by the end of a step
    assert all(len(g.samples) == 2 and g.temperature == 0.8 and g.template_version for g in groups)


async def test_a_trainer_short_of_groups_gets_a_top_up_not_a_deadlock(
    aredis: Redis, keys: Keys, engine_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    async with EngineClient(engine_url) as engine:
        s = await make(aredis, keys, engine, tiny_model, tmp_path, max_staleness=0)
        await trainer_at(aredis, keys, 0)
        # Before the first step nothing is missing (the chaos run saw "top-ups" of step 0,
        # planned in a busy loop while no train problem existed, shifting every step by one).
        assert await s._starving() == 0
        await s._generate_step(1)
        s.step = 1
        # The verifier scored 3 of the 4 groups (one was dead-lettered); the trainer holds 3.
        await aredis.xgroup_create(keys.rollouts, VERIFIERS, id="0", mkstream=True)
        for entry_id, fields in (await aredis.xreadgroup(VERIFIERS, "v", {keys.rollouts: ">"}))[0][1]:
            await aredis.xack(keys.rollouts, VERIFIERS, entry_id)
            if len(await aredis.xrange(keys.scored)) < 3:
                await aredis.xadd(keys.scored, {DATA: fields[DATA]})  # stand-in for the scored group
        await aredis.xgroup_create(keys.scored, TRAINERS, id="0", mkstream=True)
        await aredis.xreadgroup(TRAINERS, "trainer", {keys.scored: ">"})
        await trainer_at(aredis, keys, 0, buffered=3)

        assert not await s._ready_for(2)  # the staleness bound holds...
        assert await s._starving() == 1  # ...but the trainer is one group short, and none are coming
        await s._generate_step(s.step, 1, top_up=True)
        assert s.step == 1 and len(await published(aredis, keys)) == 5
        assert await s._starving() == 0  # one is on its way now: no second top-up
    groups = await published(aredis, keys)
    top_up = groups[-1]
    assert top_up.group_id.endswith("/top-up-1") and top_up.step == 1
    # The top-up is in the plan log before any of its groups is out: a restarted
    # scheduler's next top-up has a new identity, not the first one's again.
    assert s.log.top_ups == 1 and s.log.last is not None and s.log.last.top_up == 1
    restarted = await make(aredis, keys, engine, tiny_model, tmp_path, max_staleness=0)
    await restarted.restore()
    assert restarted.log.top_ups == 1 and restarted.step == 1 and restarted.log.unfinished is None


async def test_a_step_planned_again_after_a_crash_publishes_the_same_group_ids(
    aredis: Redis, keys: Keys, engine_url: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rollout service dies in the middle of a step (two of its four groups published).
    The plan was in the plan log before the first group went out, so the restarted
    scheduler publishes exactly that plan again, under the same ids, even though the
    problems changed meanwhile (a replan would choose others): downstream the copies are
    duplicates by id and nothing is trained twice under two names."""
    from services.rollout import scheduler

    real_publish = scheduler.publish
    dies_after_two = publish_dies_after(2)

    async with EngineClient(engine_url) as engine:
        await trainer_at(aredis, keys, 0)
        first = await make(aredis, keys, engine, tiny_model, tmp_path, max_concurrent_groups=1)
        monkeypatch.setattr(scheduler, "publish", dies_after_two)
        with pytest.raises(RedisConnectionError):
            await first._generate_step(1)
        monkeypatch.setattr(scheduler, "publish", real_publish)
        assert len(await published(aredis, keys)) == 2 and first.step == 0  # the step was not finished
        planned = [g.group_id for g in first.log.plans[0].groups]
        await first.store.put_many([Problem(id="new", prompt="9-4?", answer="5", hint="Count down:")])
        restarted = await make(aredis, keys, engine, tiny_model, tmp_path, max_concurrent_groups=1)
        await restarted.restore()
        assert restarted.step == 0 and restarted.log.unfinished is not None
        await restarted._publish(restarted.log.unfinished)
        assert restarted.step == 1 and restarted.log.unfinished is None
    groups = await published(aredis, keys)
    assert len(groups) == 6
    again = [g.group_id for g in groups[2:]]
    assert sorted(again) == sorted(planned)  # the step's 4 planned groups, each under its own id
    assert {g.group_id for g in groups[:2]} <= set(again)  # the first two, again under their ids
    assert len({g.group_id for g in groups}) == 4


async def test_a_group_whose_samples_the_engine_aborted_is_sampled_again_never_published(
    aredis: Redis, keys: Keys, engine_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    """The engine is paused with abort mid-generation (as before a weight update): the
    group comes back with aborted samples, which are no samples of the policy. The
    scheduler samples it again under the same id and seed once the engine goes on."""
    async with EngineClient(engine_url) as engine:
        s = await make(aredis, keys, engine, tiny_model, tmp_path)
        await s.restore()
        planned = PlannedGroup(
            group_id=group_id(1, "h", Variant.HINTED, ""), problem_id="h", variant=Variant.HINTED, seed=1
        )
        before = REGISTRY.get_sample_value("pope_rollout_groups_resampled_total") or 0.0
        await engine.pause("in_place")  # holds the request as it starts...
        try:
            sampling = asyncio.create_task(s.sample_until_whole(PROBLEMS[0], planned, 1))
            await asyncio.sleep(0.5)
            await engine.pause("abort")  # ...then aborts it: its samples come back aborted
        finally:
            await engine.resume()
        group = await asyncio.wait_for(sampling, 60)
    assert REGISTRY.get_sample_value("pope_rollout_groups_resampled_total") == before + 1
    assert group.group_id == planned.group_id and len(group.samples) == 2
    assert all(x.finish_reason is not FinishReason.ABORT for x in group.samples)


async def test_a_group_sampled_by_weights_older_than_its_step_allows_is_sampled_again(
    aredis: Redis, keys: Keys, engine_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    """The engine restarted in the middle of step 3 and serves its start-up weights (v0);
    step 3 needs at least v1 (max_staleness 1). Such a group would only be dropped as stale,
    so it is sampled again, same id and seed, once the engine serves the trainer's weights."""
    async with EngineClient(engine_url) as engine:
        s = await make(aredis, keys, engine, tiny_model, tmp_path, max_staleness=1)
        planned = PlannedGroup(
            group_id=group_id(3, "u", Variant.UNHINTED, ""), problem_id="u", variant=Variant.UNHINTED, seed=3
        )
        before = REGISTRY.get_sample_value("pope_rollout_groups_resampled_total") or 0.0
        sampling = asyncio.create_task(s.sample_until_whole(PROBLEMS[1], planned, 3))
        try:
            await asyncio.sleep(0.3)
            assert not sampling.done()
            await engine.update_weights_from_disk(str(tiny_model), 1)  # the trainer's re-push
            group = await asyncio.wait_for(sampling, 60)
        finally:
            await engine.update_weights_from_disk(str(tiny_model), 0)  # the shared engine's start version
    assert group.weight_version == 1 and group.group_id == planned.group_id
    assert (REGISTRY.get_sample_value("pope_rollout_groups_resampled_total") or 0.0) >= before + 1


async def test_with_periodic_evaluation_training_waits_for_the_start_weights_evaluation(
    aredis: Redis, keys: Keys, engine_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    """rollout.evaluation.every_steps on: step 1 waits until v0 is evaluated (a fast first
    step would otherwise move the engine on first, and the run would have no baseline);
    without problems of the evaluation's split there is nothing to wait for."""
    async with EngineClient(engine_url) as engine:
        s = await make(aredis, keys, engine, tiny_model, tmp_path, evaluation={"every_steps": 1})
        await trainer_at(aredis, keys, 0)
        assert await s._ready_for(1)  # no eval problems: no baseline to take
        await s.store.put_many([Problem(id="e", prompt="1+1?", answer="2", split="eval")])
        assert not await s._ready_for(1) and "evaluation of the start weights" in s.waiting_for
        await aredis.hset(keys.state("eval"), "weight_version", 0)  # as PeriodicEval.record writes it
        assert await s._ready_for(1) and await s._ready_for(2)


async def test_a_new_trainer_lineage_rewinds_the_scheduler_to_its_rollout_position(
    aredis: Redis, keys: Keys, engine_url: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer pushed v3 and v4, was killed, and resumed its step-2 checkpoint as
    lineage 1. The scheduler, in the middle of step 4 (cut short), closes that plan (its
    unsent groups recorded as skipped), goes back to step 2, plans step 3 again under ids
    that carry the lineage, and will not sample from an engine still serving the lost v4."""
    from services.rollout import scheduler

    real_publish = scheduler.publish
    dies_after_one = publish_dies_after(1)

    async with EngineClient(engine_url) as engine:
        await trainer_at(aredis, keys, 3)
        s = await make(aredis, keys, engine, tiny_model, tmp_path, max_concurrent_groups=1, max_staleness=1000)
        s.step = 3
        monkeypatch.setattr(scheduler, "publish", dies_after_one)
        with pytest.raises(RedisConnectionError):
            await s._generate_step(4)
        monkeypatch.setattr(scheduler, "publish", real_publish)
        cut = s.log.unfinished
        assert cut is not None and cut.lineage == 0
        lineage = Lineage().fork(1, at=2)
        await write_control(aredis, keys, TrainerControl(version=2, buffered=0, instance="t", lineage=lineage))
        await s.follow_lineage()
        assert (s.step, s.plan_lineage) == (2, 1) and s.log.unfinished is None
        skipped = s.log.published[cut.seq]  # all but the group it had sent
        assert len(skipped) == len(cut.groups) - 1 and all("lineage 0 was lost" in why for why in skipped.values())
        restarted = await make(aredis, keys, engine, tiny_model, tmp_path, max_staleness=1000)
        await restarted.restore()
        await restarted.follow_lineage()  # a restart finds the same position
        assert (restarted.step, restarted.plan_lineage) == (2, 1) and restarted.log.unfinished is None
        # The engine serves v0 of lineage 0, which lineage 1 holds (0 <= 2): ready.
        assert await restarted._ready_for(3)
        await restarted._generate_step(3)
        assert restarted.log.last is not None and restarted.log.last.lineage == 1
    groups = await published(aredis, keys)
    again = [g for g in groups if g.step == 3]
    assert again and all(g.group_id.startswith("3@1-") and g.lineage == 1 for g in again)
    assert all(s.lineage == 0 and s.weight_version == 0 for g in again for s in g.samples)
    # An engine still serving the lost v4 (its step looks ahead of the trainer's 2) is not
    # sampled from: the scheduler waits for the trainer to reload it.
    with running_engine(tiny_model, "--weight-version", "4") as lost_url:
        async with EngineClient(lost_url) as engine:
            restarted.engine = restarted.engines.client = engine
            assert not await restarted._ready_for(3) and "v4, which a rewind lost" in restarted.waiting_for
            await engine.update_weights_from_disk(str(tiny_model), 2, lineage=1)
            assert await restarted._ready_for(3)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic-inference", "sglang-default"])
async def test_a_group_is_distinct_samples_with_and_without_deterministic_inference(
    deterministic: bool,
    request: pytest.FixtureRequest,
    aredis: Redis,
    keys: Keys,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    """On SGLang one request with n = G would be G copies of one sample under deterministic
    inference (they share its seed): no GRPO signal. The group's G rows seeded seed + i
    differ in both modes; with deterministic inference the group is reproducible from its
    seed, without it (SGLang's default) the seed does not count."""
    url = request.getfixturevalue("engine_url" if deterministic else "default_engine_url")
    async with EngineClient(url) as engine:
        s = await make(aredis, keys, engine, tiny_model, tmp_path, group_size=4, max_new_tokens=24)
        first, again = [await s.sample_group(PROBLEMS[1], Variant.UNHINTED, 1) for _ in range(2)]
    completions = [tuple(x.completion_ids) for x in first.samples]
    assert len(completions) == 4 and len(set(completions)) == 4, completions
    assert ([tuple(x.completion_ids) for x in again.samples] == completions) is deterministic


async def test_a_plan_being_published_stops_when_the_trainer_begins_a_new_lineage(
    aredis: Redis, keys: Keys, engine_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    """Step 5 waits for weights the engine does not serve yet (v0 < v4), resampling; the
    trainer is killed and resumes at 0 as lineage 1, so v4 will never come under the old
    ids. The plan stops rather than resample for ever, and the next pass closes it and
    rewinds."""
    from services.rollout.scheduler import LineageChanged

    async with EngineClient(engine_url) as engine:
        await trainer_at(aredis, keys, 4)
        s = await make(aredis, keys, engine, tiny_model, tmp_path, max_staleness=0)
        publishing = asyncio.create_task(s._generate_step(5))
        await asyncio.sleep(1.0)
        assert not publishing.done()  # resampling: the engine serves v0, step 5 needs v4
        lineage = Lineage().fork(1, at=0)
        await write_control(aredis, keys, TrainerControl(version=0, buffered=0, instance="t", lineage=lineage))
        with pytest.raises(LineageChanged, match="began lineage 1 while step 5 of lineage 0"):
            await asyncio.wait_for(publishing, 30)
        await s.follow_lineage()
        assert (s.step, s.plan_lineage) == (0, 1) and s.log.unfinished is None
        assert len(s.log.published[s.log.plans[-1].seq]) == len(s.log.plans[-1].groups)  # none was sent
