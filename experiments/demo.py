"""``pope demo``: one short POPE run on the link-chains task and its report.

    pope demo [--dir runs/demo-pope] [--base-model data/base-model]

The experiment's machinery (experiments/experiment.py) with one arm and one seed, sized
for a few minutes on 2 cores: the hint search and the base model's evaluation, a POPE run
through ``pope up`` with live progress, the final checkpoint's evaluation, and an HTML
report (PNG plots, a hinted and an unhinted sample as the model wrote them) plus JSON.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from experiments.experiment import json_lines, prepare, read_metrics, run_one, run_path
from experiments.jobs import say
from experiments.spec import Spec, freeze

DEMO_SPEC = Spec(train_problems=32, steps=60)
"""``pope demo``: one POPE run, sized for about 10 minutes on 2 cores. 60 steps, not the
comparison's 30: on these 32 problems 30 steps sit on the edge of transfer, and a run
repeats only nearly; 60 steps transferred in every pilot seed (docs/experiments/demo.md)."""


def demo(out_dir: Path, base: Path, spec: Spec = DEMO_SPEC, out: TextIO = sys.stdout) -> Path:
    """One POPE run (arm ``pope``, seed 0) and its report: before/after pass@k, training curves."""
    from experiments.report import run_report

    started = time.monotonic()
    spec = freeze(out_dir, spec, out, start_over=True)  # a demo is not a comparison to protect
    prepared = prepare(out_dir, spec, base, out)
    result = run_one(out_dir, spec, base, "pope", 0, out)
    run_dir = run_path(out_dir, "pope", 0)
    data = {
        "title": f"POPE on {spec.task}: a short run on the CPU",
        "task": spec.task,
        "arm": "pope",
        "seed": 0,
        "steps": spec.steps,
        "rollouts": result["rollouts"],
        "wall_s": time.monotonic() - started,
        "base_model": str(base),
        "settings": asdict(spec),
        "before": prepared["base"],
        "after": result["after"],
        "metrics": read_metrics(run_dir),
        "hints": prepared["hints"],
    }
    data["examples"] = examples(run_dir / "rollouts" / "rollouts.jsonl")
    html = run_report(out_dir, data)
    base_row, after_row = prepared["base"]["summary"]["unhinted"], result["after"]["summary"]["unhinted"]
    k = spec.eval_k
    say(
        f"held-out hard, unhinted pass@{k}: before {base_row[f'pass@{k}']:.3f}, after {after_row[f'pass@{k}']:.3f}", out
    )
    say(f"report: {html} (open it in a browser); data: {out_dir / 'report.json'}", out)
    return html


def examples(archive: Path) -> list[dict[str, Any]]:
    """From the last step with a solved hinted sample: that sample, and an unhinted sample of
    the same problem (what POPE's two variants look like side by side)."""
    rows = json_lines(archive)
    solved = [r for r in rows if r["variant"] == "hinted" and r["reward"] > 0]
    if not solved:
        return []
    hit = max(solved, key=lambda r: r["step"])
    plain = [r for r in rows if r["variant"] == "unhinted" and r["problem_id"] == hit["problem_id"]]
    keep = ("variant", "step", "reward", "prompt", "text")
    return [{k: r[k] for k in keep} for r in [hit, *plain[-1:]]]
