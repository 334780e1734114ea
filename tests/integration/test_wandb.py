"""The trainer's wandb tracker, offline (WANDB_MODE=offline): a real trainer trains three
steps across a restart, the rollout service's evaluation writer pushes pass@k rows between
them, and what wandb wrote to disk is read back: the step metrics of both variants at their
steps, each evaluation once with its weight version, the samples table as the groups held it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import wandb
from redis.asyncio import Redis

from services.common.keys import Keys
from services.common.messages import Score, ScoredGroup, Variant
from services.common.streams import publish
from services.rollout.evaluation import EvalReport, PeriodicEval, ProblemResult, summarize
from services.rollout.settings import EvalSettings
from services.trainer.loop import Trainer
from services.trainer.settings import WandbSettings
from services.trainer.sink import NoSink
from services.trainer.tracking import SAMPLE_COLUMNS, STATE_FILE
from tests.integration.test_trainer_options import POLICY, group, offline_settings, run_steps
from tests.wandb_log import history, run_record, step_metrics

HINT = "Start from 7 + 5 = 12."
REWARDS = {Variant.HINTED: [1.0, 0.0, 0.0, 1.0], Variant.UNHINTED: [1.0, 0.0, 0.0, 0.0]}


def step_groups(trainer: Trainer) -> list[ScoredGroup]:
    """A hinted and an unhinted group of on-policy samples, each sample's text and extracted
    answer its own, the hinted prompt showing the hint."""
    out = []
    for variant, rewards in REWARDS.items():
        gid = f"s{trainer.version + 1}-{variant.value}"
        g = group(trainer, gid, variant, rewards)
        hinted = variant is Variant.HINTED
        samples = [s.model_copy(update={"text": f"{gid} says \\boxed{{{j}}}"}) for j, s in enumerate(g.samples)]
        out.append(
            ScoredGroup.model_validate(
                {
                    **dict(g),
                    "prompt": f"What is 7 + 5 + 1?{' ' + HINT if hinted else ''}",
                    "hint": HINT if hinted else None,
                    "samples": samples,
                    "scores": [Score(reward=r, extracted=str(j)) for j, r in enumerate(rewards)],
                }
            )
        )
    return out


async def push_evaluation(aredis: Redis, keys: Keys, tmp_path: Path, version: int) -> dict[str, float]:
    """An evaluation at ``version`` (``version`` of 4 unhinted samples and 3 of 4 hinted ones
    solve problem e1, none e2), recorded as the rollout service records it; its pass@k values."""
    results = [
        ProblemResult(problem_id="e1", variant=Variant.UNHINTED, n=4, successes=version, tokens=40, truncated=0),
        ProblemResult(problem_id="e2", variant=Variant.UNHINTED, n=4, successes=0, tokens=40, truncated=1),
        ProblemResult(problem_id="e1", variant=Variant.HINTED, n=4, successes=3, tokens=40, truncated=0),
    ]
    settings = EvalSettings(k=4)
    summary = summarize(results, 4)
    report = EvalReport(
        split="eval", k=4, weight_versions=[version], settings=settings, summary=summary, problems=results, seconds=1.5
    )
    writer = PeriodicEval(settings, tmp_path / "eval", aredis, keys, None, None, None)  # type: ignore[arg-type]
    await writer.record(report)
    assert summary["unhinted"]["pass@1"] == version / 8 and summary["hinted"]["pass@4"] == 1.0
    return {f"eval/{v}/{name}": summary[v][name] for v in summary for name in ("pass@1", "pass@4")}


async def test_wandb_offline_logs_steps_evaluations_and_samples_across_a_restart(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys, aredis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")  # the settings leave the mode to wandb's environment
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-env"))  # unused: the settings' dir wins
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = offline_settings(
        tiny_model,
        tmp_path,
        redis_url,
        keys,
        prompts_per_step=2,
        save_every=1,
        wandb=WandbSettings(
            project="pope-test", group="arm-a", dir=tmp_path / "wb", samples_every_steps=2, samples_max_rows=6
        ),
    )
    evals = [await push_evaluation(aredis, keys, tmp_path, 0)]  # the rollout's evaluation at step 0

    trainer = await asyncio.to_thread(Trainer, cfg, aredis, NoSink())
    stop = asyncio.Event()
    task = asyncio.create_task(trainer.run(stop))
    try:
        for g in step_groups(trainer):
            await publish(aredis, keys.scored, g, POLICY)
        await until(lambda: len(trainer.history) == 1)  # step 1 recorded; nothing trains until step 2's groups
        evals.append(await push_evaluation(aredis, keys, tmp_path, 1))
        second = step_groups(trainer)
        for g in second:
            await publish(aredis, keys.scored, g, POLICY)
        await until(lambda: len(trainer.history) == 2)
    finally:
        stop.set()
        await task
    run_id = json.loads((cfg.checkpoint_dir / STATE_FILE).read_text())["run_id"]

    evals.append(await push_evaluation(aredis, keys, tmp_path, 2))  # while the trainer is down
    again = await asyncio.to_thread(Trainer, cfg, aredis, NoSink())
    assert again.version == 2
    await run_steps(again, aredis, keys, [step_groups(again)])
    wandb.teardown()  # wandb-core writes the logs in a process of its own: until it has flushed them and gone

    # Two offline run directories (one per process), both of the one run id.
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert [r.name.rsplit("-", 1)[1] for r in runs] == [run_id, run_id]
    assert not (tmp_path / "wandb-env").exists()
    rows = [history(r) for r in runs]
    run = run_record(runs[1])
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert (
        run.run_id == run_id
        and (run.project, run.run_group) == ("pope-test", "arm-a")
        and config["learning_rate"] == cfg.learning_rate
    )
    metrics = [json.loads(line) for line in cfg.metrics_log.read_text().splitlines()]

    # The step metrics, both variants, at trainer steps 1, 2 (first process) and 3 (after the restart).
    trained = [[row for row in run if "trainer/step" in row and "loss" in row] for run in rows]
    assert [[row["trainer/step"] for row in run] for run in trained] == [[1, 2], [3]]
    for row, line in zip(trained[0] + trained[1], metrics, strict=True):
        assert row["hinted/reward_mean"] == 0.5 and row["unhinted/reward_mean"] == 0.25
        assert row["hinted/solve_rate"] == 1.0 and row["unhinted/zero_variance_frac"] == 0.0
        assert row["loss"] == line["loss"] and row["tokens"] == line["tokens"] and row["staleness/0"] == 2
    assert step_metrics(runs[0])["hinted/reward_mean"] == "trainer/step"
    assert step_metrics(runs[0])["eval/*"] == "eval/weight_version"

    # Each evaluation once, with its weight version: v0 and v1 by the first process, v2 after the restart.
    logged = [[row for row in run if "eval/weight_version" in row] for run in rows]
    assert [[row["eval/weight_version"] for row in run] for run in logged] == [[0, 1], [2]]
    for row, pushed in zip(logged[0] + logged[1], evals, strict=True):
        assert {k: row[k] for k in pushed} == pushed and row["eval/seconds"] == 1.5

    # The samples table at step 2 only (every 2 steps): 6 rows (the cap) of step 2's groups,
    # each group's first three samples.
    tables = [(run_dir, row) for run_dir, run in zip(runs, rows, strict=True) for row in run if "samples" in row]
    assert [row["trainer/step"] for _, row in tables] == [2]
    run_dir, row = tables[0]
    table = json.loads((run_dir / "files" / row["samples"]["path"]).read_text())
    assert table["columns"] == SAMPLE_COLUMNS
    got = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    want = [
        {
            "step": g.step,
            "weight_version": g.samples[j].weight_version,
            "problem_id": g.problem_id,
            "variant": g.variant.value,
            "prompt": g.prompt,
            "hint": g.hint,
            "completion": g.samples[j].text,
            "extracted": str(j),
            "reward": REWARDS[g.variant][j],
        }
        for g in second
        for j in range(3)
    ]
    assert got == want
    assert got[0]["hint"] == HINT and HINT in got[0]["prompt"] and got[3]["hint"] is None
    assert got[0]["completion"] == "s2-hinted says \\boxed{0}" and got[0]["reward"] == 1.0

    # TensorBoard, beside wandb, has the same steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "tb"))
    tb.Reload()
    assert [(e.step, e.value) for e in tb.Scalars("unhinted/reward_mean")] == [(1, 0.25), (2, 0.25), (3, 0.25)]


async def until(condition: Callable[[], bool], within_s: float = 60) -> None:
    async with asyncio.timeout(within_s):
        while not condition():
            await asyncio.sleep(0.02)
