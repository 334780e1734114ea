"""Groups per minute of the demo's POPE run with one engine and with two behind SGLang's
router, side by side: ``pope up`` on the demo's problems and settings (experiments/demo.py,
arm ``pope``), ``--engines 1`` and ``--engines 2`` in alternating pairs in one sitting.

    .venv/bin/python bench/engines.py [--pairs 3] [--steps 16] [--warmup 4] [--dir runs/bench-engines]

Each run trains ``--steps`` steps from the base model; its rate is the trainer's, groups
trained per minute between step ``--warmup`` and the last (the trainer's metrics log),
so start-up and the first steps' compilation and cache warm-up are left out. Prints every
run, the median of each arm and their ratio. The demo's hint search runs once first when
its problems are not in ``--dir`` yet (a few minutes). Every process is on the same cores:
on a machine with fewer cores than processes a second engine competes with the trainer and
the verifier for them, and the ratio says what that costs or gains.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.demo import DEMO_SPEC
from experiments.experiment import prepare, run_config
from experiments.spec import freeze
from services.up import up


def groups_per_min(metrics: Path, warmup: int, per_step: int) -> tuple[float, int]:
    """Groups trained per minute after step ``warmup``, and the last step."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    at = {int(r["step"]): float(r["at"]) for r in rows}
    last = max(at)
    return (last - warmup) * per_step / (at[last] - at[warmup]) * 60, last


def one_run(root: Path, problems: Path, base: Path, engines: int, steps: int, warmup: int, index: int) -> float:
    run_dir = root / "runs" / f"{index:02d}-engines{engines}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = run_dir / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(DEMO_SPEC, "pope", index, run_dir), sort_keys=False))
    log = io.StringIO()
    began = time.monotonic()
    code = up(str(base), str(config), None, problems, steps, run_dir, fresh=True, out=log, engines=engines)
    (run_dir / "up.log").write_text(log.getvalue())
    if code != 0:
        raise SystemExit(f"run {index} (engines {engines}) failed with {code}; see {run_dir / 'up.log'}")
    rate, last = groups_per_min(run_dir / "metrics.jsonl", warmup, DEMO_SPEC.prompts_per_step)
    print(
        f"run {index}: {engines} engine(s): {rate:6.1f} groups/min (steps {warmup}-{last}; "
        f"{time.monotonic() - began:.0f}s with start-up)",
        flush=True,
    )
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=Path("runs/bench-engines"))
    parser.add_argument("--base-model", type=Path, default=Path("data/base-model"))
    args = parser.parse_args()
    root = args.dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    spec = freeze(root, DEMO_SPEC, sys.stdout, start_over=False)
    prepare(root, spec, args.base_model, sys.stdout)
    problems = root / "problems" / "pope.jsonl"
    print(f"{os.cpu_count()} cores; the demo's settings, {args.steps} steps a run, rates after step {args.warmup}")
    rates: dict[int, list[float]] = {1: [], 2: []}
    for pair in range(args.pairs):
        for engines in (1, 2) if pair % 2 == 0 else (2, 1):
            index = 2 * pair + (engines if pair % 2 == 0 else 3 - engines) - 1
            rates[engines].append(one_run(root, problems, args.base_model, engines, args.steps, args.warmup, index))
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"median groups/min: 1 engine {one:.1f}, 2 engines {two:.1f}; ratio (2 / 1) {two / one:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
