"""What the trainer's two writes cost, side by side: the engine's model directory (every
step) and the resume state (every ``save_every`` steps), on the tiny model and on a
Qwen3-0.6B-shaped one (random weights, the real shapes), each written as the trainer
writes it (services/trainer/checkpoint.py: temporary directory, fsync, rename).

    .venv/bin/python bench/checkpoint_cost.py [--repeats 3] [--dir DIR] [--skip-large]

Prints, per model, the median seconds and bytes of each write and their ratio: the resume
state costs R engine directories, so ``save_every`` = N adds R / N of one per step, and a
crash retrains at most N steps' groups. The engine directory is written in bf16 (what a
GPU serves) and in float32 (what the CPU engine serves). ``--dir`` should be on the disk a
run would use (default: a temporary directory under runs/). Needs about 10 GB of free disk
and 12 GB of memory for the 0.6B shape.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_trainer import SHAPES
from services.engine.tiny_model import build_tiny_model
from services.trainer import checkpoint
from services.trainer.operations import Ranks
from services.trainer.policy import Logprobs, Policy
from services.trainer.settings import TrainerSettings
from services.trainer.world import World

QWEN3_0_6B = {**SHAPES["qwen3-0.6b"], "max_position_embeddings": 40960, "tie_word_embeddings": True}
"""Qwen/Qwen3-0.6B's config.json (its embeddings are tied, as the tiny model's)."""


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def with_adam_state(model: Any) -> torch.optim.Optimizer:
    """AdamW after one step, so its two moments exist (as in a resume state after training)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in model.parameters():
        p.grad = None
    return optimizer


def measure(name: str, model: Any, tokenizer: Any, root: Path, repeats: int) -> dict[str, float]:
    optimizer = with_adam_state(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    ranks = Ranks(Policy(Logprobs(model), None, optimizer, scheduler, tokenizer, TrainerSettings(), World()))
    shard = 4096 << 20
    times: dict[str, list[float]] = {"engine_bf16": [], "engine_fp32": [], "resume": []}
    sizes: dict[str, int] = {}
    for i in range(repeats):
        for key, dtype in (("engine_bf16", torch.bfloat16), ("engine_fp32", torch.float32)):
            start = time.perf_counter()
            path = checkpoint.save_weights(root, model, tokenizer, i + 1, 0, dtype, shard)
            times[key].append(time.perf_counter() - start)
            sizes[key] = size_of(path)
            shutil.rmtree(path)
        start = time.perf_counter()
        state = checkpoint.TrainerState(step=i + 1, trained_group_ids=[f"g{j}" for j in range(320)])
        path = ranks.save_resume(root, state, {"bench": True}, keep=1)
        times["resume"].append(time.perf_counter() - start)
        sizes["resume"] = size_of(path)
    shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{name}: {params / 1e6:.1f}M parameters, {repeats} repeats (median)")
    for key in times:
        print(f"  {key:12s} {med[key]:8.3f} s  {sizes[key] / 2**20:10.1f} MiB")
    for key in ("engine_bf16", "engine_fp32"):
        print(f"  resume / {key}: {med['resume'] / med[key]:.2f}x time, {sizes['resume'] / sizes[key]:.2f}x bytes")
    return {**med, **{f"{k}_bytes": float(v) for k, v in sizes.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--skip-large", action="store_true", help="the tiny model only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    base = args.dir or Path("runs")
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix="checkpoint-cost-") as tmp:
        root = Path(tmp)
        tiny_dir = build_tiny_model(root / "tiny")
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
        tiny = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
        measure("tiny model", tiny, tokenizer, root / "tiny-ckpt", args.repeats)
        if args.skip_large:
            return
        torch.manual_seed(0)
        large = Qwen3ForCausalLM(Qwen3Config(**QWEN3_0_6B)).float()
        measure("Qwen3-0.6B shape", large, tokenizer, root / "large-ckpt", args.repeats)


if __name__ == "__main__":
    main()
