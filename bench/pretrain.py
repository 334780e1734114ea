"""Pretraining step time: one padded batch through HF's loss against ``sft_backward``, side by side.

    .venv/bin/python bench/pretrain.py [--steps 30] [--threads 1] [--batch 32] [--loop-steps 200]

Both take the forward and backward pass of the same batches of ``pope model pretrain``'s
material (drawn as it draws them, seed 0) on copies of one freshly built base model: the
old way, the batch right-padded to its longest row with an attention mask and the model's
own loss; the new way, ``sft_backward`` with 1 to 4 micro-batches (rows sorted by length,
each part padded to its own longest, no mask, the LM head only where there is a label).
Steps alternate between the ways, so drift on a noisy machine hits all alike. Prints each
way's median step time (the first 4 steps left out), its ratio to the old way, and the
largest gradient difference from the old way on the first batch (float rounding only).

Then the whole loop, ``pretrain()`` itself for ``--loop-steps`` steps (a 1-problem report),
in child processes, alternately with glibc's default malloc and with the settings it runs
with (``keep_freed_memory``, services/common/malloc.py), twice each: median seconds and
minor page faults of each, and their ratio. ``--loop-steps 0`` leaves this part out.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import pretrain as p
from services.engine.tiny_model import build_tiny_model


def padded_batch(model: Any, rows: p.Rows) -> float:
    ids, attn, labels = p.sft_batch(rows)
    loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    loss.backward()
    return float(loss.detach())


LOOP = """
import resource, sys, tempfile, time, torch
from pathlib import Path
from experiments.pretrain import pretrain
torch.set_num_threads(int(sys.argv[2]))
start, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
pretrain(Path(tempfile.mkdtemp()) / "m", steps=int(sys.argv[1]), report_problems=1,
         keep_freed_memory=sys.argv[3] == "1", log=open("/dev/null", "w"))
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def whole_loop(steps: int, threads: int) -> None:
    root = Path(__file__).resolve().parent.parent
    runs: dict[str, list[tuple[float, int]]] = {"glibc default": [], "keep_freed_memory": []}
    print(f"pretrain() for {steps} steps, torch threads {threads}, in child processes", flush=True)
    for _ in range(2):
        for name, flag in (("glibc default", "0"), ("keep_freed_memory", "1")):
            out = subprocess.run(
                [sys.executable, "-c", LOOP, str(steps), str(threads), flag],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            )
            seconds, faults = out.stdout.split()[-2:]
            runs[name].append((float(seconds), int(faults)))
            print(f"  {name}: {float(seconds):.1f} s, {int(faults):,} minor page faults", flush=True)
    base = statistics.median(s for s, _ in runs["glibc default"])
    for name, got in runs.items():
        med = statistics.median(s for s, _ in got)
        faults = statistics.median(f for _, f in got)
        print(f"{name:>24}: {med:6.1f} s  x{base / med:.2f}  {faults:,.0f} minor page faults")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, for a quiet comparison)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--loop-steps", type=int, default=200, help="steps of the whole-loop part (0: leave it out)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    out = Path(tempfile.mkdtemp()) / "model"
    torch.manual_seed(0)
    build_tiny_model(out, p.SPEC, corpus=p.corpus(), init_std=0.02)
    stream = p.material(AutoTokenizer.from_pretrained(out), 0, args.batch)
    batches = [next(stream) for _ in range(args.steps)]
    ways: dict[str, Callable[[Any, p.Rows], float]] = {"one padded batch": padded_batch}
    for parts in (1, 2, 3, 4):
        ways[f"sft_backward, {parts} part{'s' * (parts > 1)}"] = lambda m, r, k=parts: p.sft_backward(m, r, k)
    models = {name: AutoModelForCausalLM.from_pretrained(out).train() for name in ways}
    times: dict[str, list[float]] = {name: [] for name in ways}
    first_grad: dict[str, torch.Tensor] = {}
    real = sum(len(a) + len(b) for rows in batches for a, b in rows)
    padded = sum(len(rows) * max(len(a) + len(b) for a, b in rows) for rows in batches)
    print(
        f"{args.steps} steps of {args.batch} rows, torch threads {args.threads}; "
        f"real tokens {real / padded:.0%} of the padded batches",
        flush=True,
    )
    for i, rows in enumerate(batches):
        for name, way in ways.items():
            model = models[name]
            start = time.perf_counter()
            way(model, rows)
            times[name].append(time.perf_counter() - start)
            if i == 0:
                first_grad[name] = torch.cat([q.grad.flatten() for q in model.parameters()])
            model.zero_grad()
        if (i + 1) % 10 == 0:
            print(f"  step {i + 1}/{args.steps}", flush=True)
    base = statistics.median(times["one padded batch"][4:])
    for name in ways:
        med = statistics.median(times[name][4:])
        diff = float((first_grad[name] - first_grad["one padded batch"]).abs().max())
        print(f"{name:>24}: {med * 1000:7.1f} ms/step  x{base / med:.2f}  max |grad diff| {diff:.1e}")
    if args.loop_steps:
        whole_loop(args.loop_steps, args.threads)


if __name__ == "__main__":
    main()
