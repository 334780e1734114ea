"""``pope up`` on the link-chains GRPO workload, step by step: where a step's time goes, the
trained samples a second, and each process's CPU and involuntary context switches.

    .venv/bin/python bench/up_levers.py [--steps 18] [--warmup 3] [--out runs/up-levers]
        [--set trainer.weight_sync=broadcast ...]

The workload: 64 hard link-chains train problems (experiments/chains.py), unhinted, the
chains prompt template, G = 8, 8 prompts a step, 96 new tokens, T = 0.8, lr 1e-4, no KL,
one verifier worker, on data/base-model. ``--set section.field=value`` adds to the config
(YAML values). After the run it prints the median of every ``time_*_s`` of the trainer's
metrics log past the warm-up steps, the median period between steps (trained samples a
second = 64 / period), and per child process the CPU seconds and nonvoluntary context
switches (all threads) taken between the end of the warm-up and the last step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.chains import hard_splits  # noqa: E402
from services.common.redis_server import free_port  # noqa: E402

SAMPLES_PER_STEP = 64


def config(out: Path, sets: list[str]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "shared": {
            "key_prefix": f"up-levers-{free_port()}:",
            "group_size": 8,
            "prompts_per_step": 8,
            "max_staleness": 1,
            "max_new_tokens": 96,
        },
        "engine": {"port": free_port(), "max_batch": 64, "enable_deterministic_inference": True},
        "rollout": {
            "port": free_port(),
            "prompt_template": yaml.safe_load((ROOT / "configs" / "chains.yaml").read_text())["rollout"][
                "prompt_template"
            ],
            "hinted_fraction": 0.0,
            "temperature": 0.8,
            "archive_dir": str(out / "rollouts"),
            "eval_dir": str(out / "eval"),
        },
        "verifier": {"port": free_port(), "workers": 1},
        "trainer": {
            "port": free_port(),
            "checkpoint_dir": str(out / "checkpoints"),
            "tensorboard_dir": None,
            "metrics_log": str(out / "metrics.jsonl"),
            "learning_rate": 1e-4,
            "micro_batch_tokens": 8192,
            "keep_checkpoints": 2,
        },
    }
    for item in sets:
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        cfg.setdefault(section, {})[field] = yaml.safe_load(value)
    return cfg


def problems() -> list[dict[str, Any]]:
    train, _ = hard_splits()
    return [{**i.problem("train").model_dump(mode="json"), "hint": None} for i in train[:64]]


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for c in map(int, out) for d in (c, *descendants(c))]


def counters(pid: int) -> dict[int, tuple[str, float, int]]:
    """(name, CPU seconds, nonvoluntary context switches over all threads) of each descendant."""
    rows = {}
    for p in descendants(pid):
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            switches = 0
            for task in Path(f"/proc/{p}/task").iterdir():
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("nonvoluntary_ctxt_switches"):
                        switches += int(line.split()[1])
        except (OSError, IndexError):
            continue
        words = [a.decode() for a in argv if a]
        name = words[words.index("services.cli") + 1] if "services.cli" in words else "scoring worker"
        rows[p] = (name, (int(stat[11]) + int(stat[12])) / 100, switches)  # utime + stime, in ticks
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/up-levers"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config(out, args.set), sort_keys=False))
    (out / "problems.json").write_text(json.dumps(problems()))
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    command = [sys.executable, "-m", "services.cli", "up", "--model", str(ROOT / "data" / "base-model")]
    command += ["--config", str(out / "config.yaml"), "--problems", str(out / "problems.json")]
    command += ["--steps", str(args.steps), "--run-dir", str(out), "--fresh"]
    with (out / "up.log").open("w") as log:
        up = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        start: dict[int, tuple[str, float, int]] | None = None
        last: dict[int, tuple[str, float, int]] = {}
        while up.poll() is None:
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if done >= args.steps:
                break
            now = counters(up.pid)
            if start is None and done >= args.warmup:
                start = now
            last = now
            time.sleep(1.0)
        up.wait()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    warm = rows[args.warmup :]
    for key in [*sorted(k for k in rows[0] if k.startswith("time_")), "step_seconds"]:
        print(f"{key:28s} median {statistics.median(r[key] for r in warm):.3f} s")
    period = statistics.median(b["at"] - a["at"] for a, b in itertools.pairwise(warm))
    print(f"period between steps: median {period:.3f} s -> {SAMPLES_PER_STEP / period:.1f} trained samples/s")
    print(f"process (steps {args.warmup}..{len(rows)}): CPU s, nonvoluntary context switches")
    for pid, (name, cpu, switches) in last.items():
        cpu0, sw0 = (start or {}).get(pid, (name, 0.0, 0))[1:]
        print(f"  {name:16s} {cpu - cpu0:7.1f} {switches - sw0:8d}")
    for line in (out / "up.log").read_text().splitlines():
        if "threads on" in line:
            print(line)


if __name__ == "__main__":
    main()
