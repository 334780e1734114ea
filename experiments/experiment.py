"""POPE against GRPO on the link-chains task (experiments/chains.py), through the real services (``pope up``).

    pope experiment pope-vs-grpo --seeds 4 [--dir runs/experiment] [--base-model data/base-model]
    (``pope demo``, experiments/demo.py: one short POPE run of this machinery, and its report)

Everything an arm trains on is prepared once and frozen in ``<dir>/experiment.json``: the
task version, the base model (by the hash of its weights), the problems, the hints the
base model's hint search found (``pope hints build``'s search, run here), and every
training and evaluation setting. A later sitting with different settings is refused
rather than mixed in. Arms get the same rollouts per step (matched compute):

- ``pope``: the hard problems; each one with a hint is shown hinted and unhinted, 1:1;
- ``grpo``: the same hard problems, unhinted only (no reward where none is ever solved);
- ``grpo_easy``: GRPO with as many easy problems (short chains) mixed in;
- ``hinted_only``: the hard problems that have a hint, hinted only (the ablation).

Each (arm, seed) is one ``pope up`` run in ``<dir>/runs/<arm>/seed<N>/``; its final
checkpoint is then evaluated on the held-out hard split (unhinted and hinted pass@1 and
pass@k) and ``result.json`` marks it done. Finished runs are skipped; an unfinished one
resumes from its newest checkpoint (the trainer resumes, and restores the scheduler's
position even into an empty Redis), so the experiment can span several sittings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import yaml

from experiments.chains import EASY_SIZES, hard_splits, instances
from experiments.jobs import build_hints, evaluate_model, say, summary_line
from experiments.pretrain import TEMPLATE
from experiments.report import within_reach
from experiments.spec import ARMS, Spec, freeze
from services.common.messages import Problem, ProblemLabel
from services.common.redis_server import free_port
from services.rollout.evaluation import EvalReport

# --- preparing: problems, hints, the base model's evaluation -----------------------------


def write_jsonl(path: Path, problems: list[Problem]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(p.model_dump_json(exclude_none=True) + "\n" for p in problems))
    tmp.replace(path)


def read_jsonl(path: Path) -> list[Problem]:
    return [Problem.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]


def task_problems(spec: Spec) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """Hard train problems, held-out hard problems (hint: the first half of the path, for
    hinted evaluation), and easy train problems; all fixed by the task's seeds."""
    train, held_out = hard_splits(eval=spec.eval_problems)
    hard = [i.problem("train") for i in train[: spec.train_problems]]
    evals = [i.problem("eval").model_copy(update={"hint": i.eval_hint}) for i in held_out]
    exclude = frozenset(i.key for i in train + held_out)
    # Easy problems: short chains, whose whole path the base model was taught.
    easy = [i.problem("train") for i in instances("pretrain", spec.train_problems, EASY_SIZES, exclude)]
    return hard, evals, [p.model_copy(update={"label": ProblemLabel.EASY}) for p in easy]


def arm_problems(searched: list[Problem], easy: list[Problem]) -> dict[str, list[Problem]]:
    """Each arm's problems: the searched hard problems (with their hints: POPE), the same
    problems plain (GRPO: no hint, so no search verdict either), with easy ones mixed in,
    and only those that have a hint (the hinted-only ablation)."""
    plain = [Problem.model_validate({**p.model_dump(), "hint": None, "label": None, "search": None}) for p in searched]
    return {
        "pope": searched,
        "grpo": plain,
        "grpo_easy": plain + easy,
        "hinted_only": [p for p in searched if p.hint is not None],
    }


def prepare(exp_dir: Path, spec: Spec, base: Path, out: TextIO) -> dict[str, Any]:
    """Problems per arm, hints and the base model's evaluation, each made once (files)."""
    pdir = exp_dir / "problems"
    hard, evals, easy = task_problems(spec)
    if not (pdir / "eval.jsonl").exists():
        write_jsonl(pdir / "eval.jsonl", evals)
    hints_path = exp_dir / "hints.json"
    if not hints_path.exists():
        say(
            f"hint search over {len(hard)} hard train problems with the base model (k={spec.hint_k} unhinted, "
            f"k_hint={spec.hint_k_hint} per prefix)",
            out,
        )
        prefix = f"pope-exp-{spec.base_model_sha256[:12]}-{os.getpid()}:hints:"
        searched, summary = build_hints(spec.hint_settings(), base, hard, prefix, exp_dir / "logs" / "hints", out)
        write_jsonl(pdir / "hard_train.jsonl", searched)
        hints_path.write_text(json.dumps(summary, indent=2) + "\n")
    by_arm = arm_problems(read_jsonl(pdir / "hard_train.jsonl"), easy)
    searched = by_arm["pope"]
    for arm, rows in by_arm.items():
        write_jsonl(pdir / f"{arm}.jsonl", rows)
    if not by_arm["hinted_only"]:
        say(
            f"warning: the hint search found no working hint for any of {len(searched)} problems: pope trains "
            "like grpo, and hinted_only has nothing to train on",
            out,
        )
    base_path = exp_dir / "base_eval.json"
    if not base_path.exists():
        report = evaluate_model(spec.eval_settings(), base, evals, exp_dir / "logs" / "base-eval", out)
        base_path.write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    base_eval = json.loads(base_path.read_text())
    if reach := within_reach(base_eval):
        say(f"warning: on the held-out hard problems: {reach}", out)
    return {"hints": json.loads(hints_path.read_text()), "base": base_eval}


def run_config(spec: Spec, arm: str, seed: int, run_dir: Path) -> dict[str, Any]:
    """The one config file of a run's ``pope up`` (ports are free ones, chosen per sitting).
    Redis keys are the run directory's own, so two experiments never share a run's state."""
    a = ARMS[arm]
    where = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
    return {
        "shared": {
            "key_prefix": f"pope-exp-{where}:{arm}:s{seed}:",
            "group_size": spec.group_size,
            "prompts_per_step": spec.prompts_per_step,
            "max_staleness": 1,
            "max_new_tokens": spec.max_new_tokens,
            "seed": seed,
        },
        "engine": {"port": free_port(), "max_batch": 64, "enable_deterministic_inference": True},
        "rollout": {
            "port": free_port(),
            "prompt_template": TEMPLATE.model_dump(),
            "hinted_fraction": a.hinted_fraction,
            "include_easy": True,
            "temperature": spec.temperature,
            "top_p": spec.top_p,
            "hints": spec.hint_settings().model_dump(),
            "archive_dir": str(run_dir / "rollouts"),
            "eval_dir": str(run_dir / "eval"),
        },
        "verifier": {"port": free_port(), "workers": 1},
        "trainer": {
            "port": free_port(),
            "checkpoint_dir": str(run_dir / "checkpoints"),
            "tensorboard_dir": None,
            "metrics_log": str(run_dir / "metrics.jsonl"),
            "learning_rate": spec.learning_rate,
            "micro_batch_tokens": 8192,
            "keep_checkpoints": 2,
            **spec.extra,
        },
    }


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON Lines file (none if it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_path(exp_dir: Path, arm: str, seed: int) -> Path:
    return exp_dir / "runs" / arm / f"seed{seed}"


def trained_steps(run_dir: Path) -> int:
    from services.trainer.checkpoint import latest

    newest = latest(run_dir / "checkpoints")
    return int(newest.name.split("-")[-1]) if newest else 0


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    last: dict[int, dict[str, Any]] = {}
    # A resumed run may log a step twice: the later line is the one trained on.
    for row in json_lines(run_dir / "metrics.jsonl"):
        last[int(row["step"])] = row
    # NaN marks a step without groups of a variant; null keeps the report's JSON strict.
    return [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in last[s].items()} for s in sorted(last)
    ]


def run_one(exp_dir: Path, spec: Spec, base: Path, arm: str, seed: int, out: TextIO) -> dict[str, Any]:
    """One (arm, seed): train through ``pope up`` (resuming if begun), evaluate, mark done."""
    from services.trainer.checkpoint import latest_weights

    run_dir = run_path(exp_dir, arm, seed)
    result_path = run_dir / "result.json"
    if result_path.exists():
        return dict(json.loads(result_path.read_text()))
    train(exp_dir, spec, base, arm, seed, out)
    final = latest_weights(run_dir / "checkpoints")  # the model directory the engine serves
    assert final is not None
    held_out = read_jsonl(exp_dir / "problems" / "eval.jsonl")
    report = evaluate_model(spec.eval_settings(), final, held_out, run_dir / "logs" / "eval", out)
    sittings = json_lines(run_dir / "sittings.jsonl")
    result = {
        "arm": arm,
        "seed": seed,
        "status": "done",
        "steps": spec.steps,
        "rollouts": len(json_lines(run_dir / "rollouts" / "rollouts.jsonl")),
        "wall_s": sum(s["seconds"] for s in sittings),
        "after": report.model_dump(mode="json"),
        "checkpoint": str(final),
    }
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def train(exp_dir: Path, spec: Spec, base: Path, arm: str, seed: int, out: TextIO) -> Path:
    """Train (arm, seed) through ``pope up`` to ``spec.steps``, resuming if begun; its run directory."""
    from services.up import up

    run_dir = run_path(exp_dir, arm, seed)
    if not read_jsonl(exp_dir / "problems" / f"{arm}.jsonl"):
        raise SystemExit(
            f"pope experiment: arm {arm} has no problems to train on (see the hint search above); "
            "leave it out with --arms"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    done = trained_steps(run_dir)
    if done < spec.steps:
        say(
            f"{arm} seed {seed}: " + (f"resuming at step {done}" if done else "starting") + f" ({spec.steps} steps)",
            out,
        )
        config = run_dir / "config.yaml"
        config.write_text(yaml.safe_dump(run_config(spec, arm, seed, run_dir), sort_keys=False))
        started = time.monotonic()
        # No checkpoint yet: a new run, so any Redis state under its keys is from an attempt
        # cut short before its first step and is wiped; otherwise everything resumes.
        code = up(
            str(base),
            str(config),
            None,
            exp_dir / "problems" / f"{arm}.jsonl",
            spec.steps,
            run_dir,
            fresh=done == 0,
            out=out,
        )
        reached = trained_steps(run_dir)
        with (run_dir / "sittings.jsonl").open("a") as f:
            f.write(json.dumps({"from_step": done, "to_step": reached, "seconds": time.monotonic() - started}) + "\n")
        if code != 0 or reached < spec.steps:
            raise SystemExit(
                f"pope experiment: {arm} seed {seed} stopped at step {reached} of {spec.steps}; "
                "run the same command to resume it"
            )
    return run_dir


def run_parallel(
    exp_dir: Path, spec: Spec, base: Path, pairs: list[tuple[str, int]], workers: int, out: TextIO
) -> dict[tuple[str, int], dict[str, Any]]:
    """``run_one`` for up to ``workers`` (arm, seed) pairs at once, each in its own process
    with its share of the cores (torch threads); a run's own output goes to its
    ``logs/experiment.log``, and a progress line comes every minute. Every run goes on when
    another fails; the failures are reported together at the end. Ctrl-C or SIGTERM stops
    every run cleanly (each resumes in the next sitting)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // workers)
    say(
        f"{len(pairs)} runs, {workers} at a time, {threads} torch thread(s) each; each run's own log: "
        f"{exp_dir / 'runs'}/<arm>/seed<N>/logs/experiment.log",
        out,
    )
    results: dict[tuple[str, int], dict[str, Any]] = {}
    failed: list[str] = []
    ctx = mp.get_context("spawn")
    stopping = ctx.Event()
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(stopping,)) as pool:
        futures = {
            pool.submit(_run_one_logged, exp_dir, spec, base, arm, seed, threads): (arm, seed) for arm, seed in pairs
        }
        pending = set(futures)
        try:
            while pending:
                finished, pending = cf.wait(pending, timeout=60, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    arm, seed = futures[f]
                    try:
                        results[arm, seed] = f.result()
                    except (Exception, SystemExit) as e:
                        failed.append(f"{arm} seed {seed}: {e}")
                        say(
                            f"{arm} seed {seed} failed: {e} (its log: "
                            f"{run_path(exp_dir, arm, seed) / 'logs' / 'experiment.log'})",
                            out,
                        )
                        continue
                    say(done_line(arm, seed, results[arm, seed]), out)
                if pending:
                    steps = {futures[f]: len(read_metrics(run_path(exp_dir, *futures[f]))) for f in pending}
                    now = ", ".join(f"{a} s{n} step {k}/{spec.steps}" for (a, n), k in sorted(steps.items()))
                    say(f"running: {now}", out)
        except BaseException:
            # Ctrl-C or SIGTERM: no queued run may start (a worker whose run stopped would
            # take the next one), and each running `pope up` stops cleanly.
            stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            for child in mp.active_children():
                child.terminate()
            raise
    if failed:
        raise SystemExit("pope experiment: " + "; ".join(failed) + "\nrun the same command to resume")
    return results


def done_line(arm: str, seed: int, result: dict[str, Any]) -> str:
    return f"{arm} seed {seed} done: {summary_line(EvalReport.model_validate(result['after']))}"


_STOPPING: Any = None
"""In a worker process of ``run_parallel``: the event set when the experiment is stopping."""


def _worker_init(stopping: Any) -> None:
    global _STOPPING
    _STOPPING = stopping


def _run_one_logged(exp_dir: Path, spec: Spec, base: Path, arm: str, seed: int, threads: int) -> dict[str, Any]:
    """``run_one`` in a worker process of ``run_parallel``: its torch threads, its own log;
    refused once the experiment is stopping (a run queued to this worker before the stop)."""
    if _STOPPING is not None and _STOPPING.is_set():
        raise SystemExit("not started: the experiment was stopping")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the run's services
    log_path = run_path(exp_dir, arm, seed) / "logs" / "experiment.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        return run_one(exp_dir, spec, base, arm, seed, log)


def experiment(
    exp_dir: Path, base: Path, seeds: int, arms: list[str], spec: Spec, out: TextIO = sys.stdout, parallel: int = 1
) -> Path:
    """Every (arm, seed) not yet done, seed by seed, or ``parallel`` at a time; then the
    table and report."""
    from experiments.report import experiment_report

    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"pope experiment: unknown arm(s) {unknown}; arms are {', '.join(ARMS)}")
    if parallel < 1:
        raise SystemExit(f"pope experiment: --parallel must be at least 1, got {parallel}")
    spec = freeze(exp_dir, spec, out)
    prepared = prepare(exp_dir, spec, base, out)
    pairs = [(arm, seed) for seed in range(seeds) for arm in arms]
    if parallel > 1:
        done = run_parallel(exp_dir, spec, base, pairs, parallel, out)
    else:
        done = {}
        for arm, seed in pairs:
            done[arm, seed] = run_one(exp_dir, spec, base, arm, seed, out)
            say(done_line(arm, seed, done[arm, seed]), out)
    runs = [done[pair] for pair in pairs]
    data = {
        "title": f"POPE vs GRPO on {spec.task}",
        "task": spec.task,
        "base_model": str(base),
        "settings": asdict(spec),
        "k": spec.eval_k,
        "base": prepared["base"],
        "arms": arms,
        "runs": runs,
        "hints": prepared["hints"],
    }
    html = experiment_report(exp_dir, data)
    say(f"report: {html}; table: {exp_dir / 'table.md'}", out)
    print((exp_dir / "table.md").read_text(), file=out, flush=True)
    return html
