"""End to end: TRL's GRPOTrainer against ``pope up``, on the same model, problems, GRPO shape
and cores, in alternating pairs in one sitting.

    PYTHONPATH=. .venv/bin/python bench/e2e.py [--pairs 5] [--warmup 2] [--steps 8] [--out FILE]

Both sides train data/base-model on the same 64 link-chains problems (experiments/chains.py,
unhinted, 6 and 7 links: the base model solves some of them), 8 prompts x 8 samples a step,
96 new tokens, T = 0.8, top-p 1, AdamW at 1e-4, no KL, TRL's ``grpo`` loss as our
``seq_mean`` (tests/unit/test_grpo_vs_trl.py), advantages not divided by the group's std.
TRL generates with HF ``generate`` and scores with the verifier's own scoring function, in
process; ``pope up`` runs the real services. Every run is a fresh process pinned to the same
``--cpus`` (default: the first two this process may use): TRL's one process with torch on
that many threads, ``pope up`` splitting them between its engine and trainer as it does.

Trained samples/s: the samples in the optimizer steps after ``--warmup`` divided by the wall
time from the end of the last warm-up step to the end of the last step. Prints each pair,
then the medians and their ratio, where a ``pope up`` step's wall time goes, CPU seconds per
process over the measured steps, and both sides' mean reward per step (the learning curves).
Results: docs/benchmarks.md, "End to end: POPE-RL against TRL's GRPOTrainer".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.chains import instances  # noqa: E402
from experiments.pretrain import TEMPLATE  # noqa: E402
from services.common.messages import Problem, Variant  # noqa: E402
from services.common.redis_server import free_port  # noqa: E402
from services.rollout.prompts import user_message  # noqa: E402

MODEL = ROOT / "data" / "base-model"
SIZES = (6, 7)
"""Chain lengths of the problems: 6 links the base model often solves unguided, 7 rarely,
so groups are mixed and both learning curves can move (or fail to match)."""
G, PROMPTS, NEW_TOKENS, TEMPERATURE, TOP_P, LR = 8, 8, 96, 0.8, 1.0, 1e-4
WEIGHT_DECAY, GRAD_CLIP, CLIP_EPS = 0.01, 0.3, 0.2
"""Our trainer's AdamW weight decay and gradient clip, given to TRL too (its defaults: 0, 1.0)."""
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
PUBLISHED = re.compile(r"step (\d+): published (\d+) groups .* in ([\d.]+)s")


def problems() -> list[Problem]:
    """The 64 problems both sides train on: the train split's first 64 of SIZES."""
    return [inst.problem("train") for inst in instances("train", 64, SIZES)]


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (/proc/<pid>/stat), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: pid -> its parent."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {}, [root]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                found[child] = p
                frontier.append(child)
    return found


def role(pid: int, up_pid: int, tree: dict[int, int]) -> str:
    """The service a descendant of ``pope up`` belongs to: its top-level child's subcommand
    (the verifier's scoring workers count as the verifier)."""
    while tree.get(pid, up_pid) != up_pid:
        pid = tree[pid]
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return "?"
    return args[args.index("services.cli") + 1] if "services.cli" in args else Path(args[0]).name


# ---- TRL: one run in a fresh process (``--trl-child``), one JSON line on stdout ----


def trl_child(seed: int, steps: int, threads: int) -> None:
    import torch
    from datasets import Dataset  # type: ignore[import-untyped]
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer  # type: ignore[attr-defined]

    from services.rollout.prompts import prompt_ids
    from services.verifier.scoring import Scorer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    rows: list[dict[str, Any]] = [
        {"prompt": [{"role": "user", "content": user_message(p, Variant.UNHINTED, TEMPLATE)}]} for p in problems()
    ]
    # The verifier's own scorer, memory included (each gold parsed and each answer judged once).
    scorer = Scorer()
    golds = {r["prompt"][0]["content"]: p.answer for r, p in zip(rows, problems(), strict=True)}
    # The call TRL makes (GRPOTrainer._tokenize_prompts) must give the rollout service's prompt ids.
    encoded: Any = tokenizer.apply_chat_template(
        conversation=[r["prompt"] for r in rows], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    theirs = encoded["input_ids"]
    ours = [prompt_ids(tokenizer, r["prompt"][0]["content"]) for r in rows]
    assert [list(x) for x in theirs] == ours, "TRL's prompt ids differ from the rollout service's"
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}

    def scored(prompt: Any, completion: Any, ids: list[int]) -> float:
        # As the verifier scores a group: math-verify on the text, 0 for a truncated sample.
        if not ids or ids[-1] not in stops:
            return 0.0
        gold = golds[prompt[0]["content"]]
        return scorer.score(gold, scorer.gold(gold), completion[0]["content"]).reward

    def reward(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [scored(*row) for row in zip(prompts, completions, completion_ids, strict=True)]

    ends: list[tuple[float, float]] = []  # (wall, this process's CPU) at each optimizer step's end
    rewards: list[float] = []
    lengths: list[float] = []  # mean completion tokens per step

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ends.append((time.time(), time.process_time()))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))
                lengths.append(float(logs["completions/mean_length"]))

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,  # TRL's default is on; our trainer's layer_checkpointing is off
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=1,
            seed=seed,
            max_steps=steps,
            per_device_train_batch_size=G * PROMPTS,  # one optimizer step per generation of 64 samples
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            num_iterations=1,
            num_generations=G,
            max_completion_length=NEW_TOKENS,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            top_k=0,
            learning_rate=LR,
            lr_scheduler_type="constant",
            optim="adamw_torch",  # betas 0.9/0.999, eps 1e-8 by default, as ours
            weight_decay=WEIGHT_DECAY,
            max_grad_norm=GRAD_CLIP,
            loss_type="grpo",
            scale_rewards="none",
            epsilon=CLIP_EPS,
            beta=0.0,
        )
        trainer = GRPOTrainer(
            model=model,
            processing_class=tokenizer,
            reward_funcs=[reward],  # type: ignore[list-item]
            train_dataset=Dataset.from_list(rows),
            args=config,
            callbacks=[Clock()],
        )
        trainer.train()
    print("TRL_RESULT " + json.dumps({"ends": ends, "rewards": rewards, "lengths": lengths}), flush=True)


def run_trl(seed: int, warmup: int, steps: int, cpus: list[int]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--trl-child", str(seed), str(warmup + steps), str(len(cpus))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(len(cpus)), check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("TRL_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"the TRL run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    raw = json.loads(line.removeprefix("TRL_RESULT "))
    (t0, c0), (t1, c1) = raw["ends"][warmup - 1], raw["ends"][warmup + steps - 1]
    return {
        "samples_per_s": G * PROMPTS * steps / (t1 - t0),
        "rewards": raw["rewards"],
        "completion_tokens": statistics.mean(raw["lengths"]),
        "cpu_s": {"process": c1 - c0},
    }


# ---- pope up: the whole stack as its own processes, with the bench watching their CPU ----


def pope_config(run: Path, seed: int, verifier_workers: int = 1) -> dict[str, Any]:
    return {
        "shared": {
            "key_prefix": f"bench-e2e-{os.getpid()}-s{seed}:",
            "group_size": G,
            "prompts_per_step": PROMPTS,
            "max_staleness": 1,  # pope's default pipelining: generation one version ahead
            "max_new_tokens": NEW_TOKENS,
            "seed": seed,
        },
        # No thread counts: `pope up` splits the cores between the engine and the trainer.
        "engine": {"port": free_port(), "max_batch": G * PROMPTS},
        "rollout": {
            "port": free_port(),
            "prompt_template": TEMPLATE.model_dump(),
            "hinted_fraction": 0.0,  # and the problems have no hints: unhinted groups only
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
            "archive_dir": str(run / "rollouts"),
            "eval_dir": str(run / "eval"),
        },
        "verifier": {"port": free_port(), "workers": verifier_workers},
        "trainer": {
            "port": free_port(),
            "checkpoint_dir": str(run / "checkpoints"),
            "tensorboard_dir": None,
            "metrics_log": str(run / "metrics.jsonl"),
            "learning_rate": LR,
            "weight_decay": WEIGHT_DECAY,
            "grad_clip": GRAD_CLIP,
            "clip_eps_low": CLIP_EPS,
            "clip_eps_high": CLIP_EPS,
            "kl_coef": 0.0,
            "loss_agg": "seq_mean",
            "scale_adv_by_std": False,
            "keep_checkpoints": 2,
            "logits_chunk_tokens": 8192,  # as configs/chains.yaml: a 514-token vocabulary's head runs once
        },
    }


def run_pope(
    seed: int, warmup: int, steps: int, cpus: list[int], keep: Path | None, verifier_workers: int = 1
) -> dict[str, Any]:
    import redis

    from services.common.keys import delete_prefix

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        run = keep / f"pope-{seed}" if keep else Path(tmp)
        run.mkdir(parents=True, exist_ok=True)
        config = pope_config(run, seed, verifier_workers)
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (run / "problems.json").write_text(json.dumps([p.model_dump(mode="json") for p in problems()]))
        cmd = [sys.executable, "-m", "services.cli", "up", "--model", str(MODEL), "--config", str(run / "config.yaml")]
        cmd += ["--redis-url", REDIS_URL, "--problems", str(run / "problems.json"), "--steps", str(warmup + steps)]
        cmd += ["--run-dir", str(run), "--fresh", "--no-restart"]
        samples: dict[int, list[tuple[float, float]]] = {}  # pid -> (wall, CPU seconds) samples
        roles: dict[int, str] = {}
        with open(run / "up.log", "w") as log:
            up = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env())
            while up.poll() is None:
                tree = descendants(up.pid)
                for pid in [up.pid, *tree]:
                    if (cpu := cpu_seconds(pid)) is not None:
                        if roles.get(pid, "up") == "up":  # a child seen before its exec still reads as `up`
                            roles[pid] = "up" if pid == up.pid else role(pid, up.pid, tree)
                        samples.setdefault(pid, []).append((time.time(), cpu))
                time.sleep(0.5)
        client = redis.Redis.from_url(REDIS_URL)
        delete_prefix(client, config["shared"]["key_prefix"])
        client.close()
        if up.returncode != 0:
            raise SystemExit(f"pope up failed ({up.returncode}):\n{(run / 'up.log').read_text()[-3000:]}")
        rows = sorted((json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()), key=lambda r: r["at"])
        rollout_log = (run / "logs" / "rollout.log").read_text()
        generate = [float(s) for _, n, s in PUBLISHED.findall(rollout_log) if int(n) == PROMPTS]
        archive = (run / "rollouts" / "rollouts.jsonl").read_text().splitlines()
        tokens = statistics.mean(json.loads(x)["completion_tokens"] for x in archive)
    t0, t1 = rows[warmup - 1]["at"], rows[warmup + steps - 1]["at"]
    measured = rows[warmup : warmup + steps]
    return {
        "samples_per_s": sum(r["groups"] for r in measured) * G / (t1 - t0),
        "rewards": [r["reward_unhinted"] for r in rows],
        "completion_tokens": tokens,
        "cpu_s": _window_cpu(samples, roles, t0, t1),
        "parts": [_parts(r, prev["at"]) for r, prev in zip(measured, rows[warmup - 1 :], strict=False)],
        "generate_s": generate[warmup : warmup + steps],
    }


def _parts(row: dict[str, Any], previous_end: float) -> dict[str, float]:
    """Where one trainer step's wall time (end to end) went, from its metrics row."""
    parts = {
        "wait for data": row["time_waiting_for_data_s"],
        "train": row["time_forward_backward_s"] + row["time_optimizer_s"],
        "save weights": row["time_weights_s"],
        "checkpoint": row["time_checkpoint_s"],
        "push": row["time_push_s"],
    }
    return {**parts, "other": row["at"] - previous_end - sum(parts.values()), "step": row["at"] - previous_end}


def _window_cpu(
    samples: dict[int, list[tuple[float, float]]], roles: dict[int, str], t0: float, t1: float
) -> dict[str, float]:
    """CPU seconds each role spent between wall times t0 and t1 (from the 0.5 s samples)."""
    out: dict[str, float] = {}
    for pid, series in samples.items():
        before = [c for t, c in series if t <= t0]
        upto = [c for t, c in series if t <= t1]
        if upto:
            out[roles[pid]] = out.get(roles[pid], 0.0) + upto[-1] - (before[-1] if before else 0.0)
    return out


def _env(threads: int | None = None) -> dict[str, str]:
    """This environment for a child; with ``threads``, OpenMP held to that many (TRL's one
    process). ``pope up`` assigns its processes' threads itself."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


# ---- the sitting ----


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps before the measured ones (at least 1)")
    ap.add_argument("--steps", type=int, default=8, help="measured optimizer steps per run")
    ap.add_argument("--cpus", type=int, default=2, help="cores both sides are pinned to")
    ap.add_argument("--verifier-workers", type=int, default=1, help="pope's scoring processes")
    ap.add_argument("--out", type=Path, help="write every raw number here (JSON)")
    ap.add_argument("--keep", type=Path, help="keep each pope up run's directory (logs, metrics) under here")
    ap.add_argument("--report", type=Path, help="print the summary of an earlier --out file, run nothing")
    ap.add_argument("--trl-child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_child:
        trl_child(*args.trl_child)
        return
    if args.report:
        saved = json.loads(args.report.read_text())
        report(saved["pairs"], int(saved["args"]["warmup"]), int(saved["args"]["steps"]))
        return
    cpus = sorted(os.sched_getaffinity(0))[: args.cpus]
    os.sched_setaffinity(0, cpus)  # every child inherits it
    print(f"{args.pairs} pairs, {args.warmup} warm-up + {args.steps} measured steps each, on cpus {cpus}", flush=True)
    pairs = []
    for i in range(args.pairs):
        first, second = ("pope", "trl") if i % 2 == 0 else ("trl", "pope")  # alternate which goes first
        pair = {}
        for side in (first, second):
            load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
            if side == "pope":
                pair[side] = run_pope(i, args.warmup, args.steps, cpus, args.keep, args.verifier_workers)
            else:
                pair[side] = run_trl(i, args.warmup, args.steps, cpus)
            pair[side]["load"] = [load, os.getloadavg()[0]]
        pairs.append(pair)
        pope, trl = pair["pope"]["samples_per_s"], pair["trl"]["samples_per_s"]
        print(
            f"pair {i + 1}: pope {pope:.2f} samples/s, TRL {trl:.2f} samples/s, ratio {pope / trl:.2f} "
            f"(load average {pair[first]['load'][0]:.1f} at the start)",
            flush=True,
        )
        if args.out:  # after every pair, so a sitting cut short keeps what it measured
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "pairs": pairs}))
    report(pairs, args.warmup, args.steps)


def report(pairs: list[dict[str, Any]], warmup: int, steps: int) -> None:
    med = {s: statistics.median(p[s]["samples_per_s"] for p in pairs) for s in ("pope", "trl")}
    ratio = med["pope"] / med["trl"]
    print(f"\nmedian trained samples/s: pope up {med['pope']:.2f}, TRL {med['trl']:.2f}, ratio {ratio:.2f}")
    parts = [part for p in pairs for part in p["pope"]["parts"]]
    print("pope up, mean seconds per trainer step (end of the last to end of this; the parts sum to it):")
    for name in parts[0]:
        print(f"  {name:14s} {statistics.mean(x[name] for x in parts):7.3f}")
    generate = [g for p in pairs for g in p["pope"]["generate_s"]]
    if generate:
        print(f"  (concurrently) the rollout's step, sampling 8 groups: median {statistics.median(generate):.3f} s")
    tokens = {s: statistics.mean(p[s]["completion_tokens"] for p in pairs) for s in ("pope", "trl")}
    print(f"mean completion tokens: pope {tokens['pope']:.1f}, TRL {tokens['trl']:.1f}")
    print(f"CPU seconds per measured step (median over pairs of {steps} steps' CPU):")
    for side in ("pope", "trl"):
        for name in sorted({n for p in pairs for n in p[side]["cpu_s"]}):
            print(
                f"  {side} {name:10s} {statistics.median(p[side]['cpu_s'].get(name, 0.0) for p in pairs) / steps:7.3f}"
            )
        print(f"  {side} {'(all)':10s} {statistics.median(sum(p[side]['cpu_s'].values()) for p in pairs) / steps:7.3f}")
    print(f"mean reward per step (mean over pairs; steps 1-{warmup + steps}):")
    curves = {
        s: [statistics.mean(x) for x in zip(*(p[s]["rewards"][: warmup + steps] for p in pairs), strict=True)]
        for s in ("pope", "trl")
    }
    for k, (a, b) in enumerate(zip(curves["pope"], curves["trl"], strict=True)):
        print(f"  step {k + 1:2d}  pope {a:.3f}  TRL {b:.3f}")
    means = {s: [statistics.mean(p[s]["rewards"][warmup : warmup + steps]) for p in pairs] for s in ("pope", "trl")}
    spread = {s: statistics.stdev(v) if len(v) > 1 else float("nan") for s, v in means.items()}
    diff = statistics.mean(means["pope"]) - statistics.mean(means["trl"])
    se = (sum(sd**2 / len(pairs) for sd in spread.values())) ** 0.5  # of the difference of the two means
    print(
        f"mean reward over the measured steps: pope {statistics.mean(means['pope']):.3f} (sd over pairs "
        f"{spread['pope']:.3f}), TRL {statistics.mean(means['trl']):.3f} (sd {spread['trl']:.3f}); "
        f"difference {diff:+.3f}, its standard error {se:.3f}"
    )


if __name__ == "__main__":
    main()
