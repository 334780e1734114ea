"""Trainer step throughput on a randomly initialised Qwen3, on CUDA (bf16 autocast) or CPU.

    .venv/bin/python bench/gpu_trainer.py                  # CUDA if present: Qwen3-0.6B shape
    .venv/bin/python bench/gpu_trainer.py --shape small    # CPU-sized shape

Runs the trainer's own step (services/trainer/step.py: token-budget micro-batches, the
GRPO loss, AdamW, LR schedule) on synthetic on-policy groups and prints tokens/s and the
step time and its parts (median of the measured steps, after warm-up). No weights are
downloaded: the model is built from a config with random weights.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.common.messages import RawGroup, Sample, Score, ScoredGroup
from services.trainer.policy import Logprobs
from services.trainer.settings import TrainerSettings
from services.trainer.step import lr_lambda, train_step

SHAPES = {  # Qwen3-0.6B: 28 layers, hidden 1024, 16 heads (8 KV), head_dim 128, MLP 3072, vocab 151936
    "qwen3-0.6b": {
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
    },
    "small": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 4096,
    },
}


def groups(n_groups: int, size: int, prompt_len: int, response_len: int, vocab: int) -> list[ScoredGroup]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for g in range(n_groups):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        samples = [
            Sample(
                problem_id=f"p{g}",
                variant="hinted" if g % 2 else "unhinted",
                prompt_ids=prompt,
                completion_ids=torch.randint(0, vocab, (response_len,), generator=gen).tolist(),
                logprobs=[-math.log(vocab)] * response_len,
                finish_reason="stop",
                weight_version=0,
                text="",
            )
            for _ in range(size)
        ]
        raw = RawGroup(
            group_id=f"g{g}",
            problem_id=f"p{g}",
            variant=samples[0].variant,
            prompt="",
            answer="1",
            samples=samples,
            weight_version=0,
            step=1,
            temperature=1.0,
        )
        out.append(ScoredGroup.from_raw(raw, [Score(reward=float(i % 2)) for i in range(size)]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), help="default: qwen3-0.6b on CUDA, small on CPU")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=1024)
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shape = args.shape or ("qwen3-0.6b" if cuda else "small")
    if not cuda:
        torch.set_num_threads(1)
        args.prompt_len, args.response_len = min(args.prompt_len, 64), min(args.response_len, 128)
    torch.manual_seed(0)
    model: Any = Qwen3ForCausalLM(Qwen3Config(**SHAPES[shape], max_position_embeddings=8192)).to(device)
    cfg = TrainerSettings(
        device=device,
        bf16=cuda,
        prompts_per_step=args.groups,
        group_size=args.group_size,
        micro_batch_tokens=args.micro_batch_tokens,
        learning_rate=1e-6,
        max_new_tokens=args.response_len,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    data = groups(args.groups, args.group_size, args.prompt_len, args.response_len, SHAPES[shape]["vocab_size"])
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{shape} ({params / 1e6:.0f}M params) on {device}{' bf16 autocast' if cfg.bf16 else ''}: "
        f"{args.groups} groups x {args.group_size} samples, prompt {args.prompt_len} + response "
        f"{args.response_len} tokens, micro-batch budget {args.micro_batch_tokens} tokens"
    )
    times, rates, fb, opt = [], [], [], []
    for step in range(args.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        stats = train_step(Logprobs(model), None, optimizer, scheduler, data, cfg, pad_id=0, version=0)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if step == 0:
            continue  # warm-up
        times.append(elapsed)
        rates.append(stats["tokens"] / elapsed)
        fb.append(stats["time_forward_backward_s"])
        opt.append(stats["time_optimizer_s"])
    print(
        f"step time median {statistics.median(times):.3f}s (forward+backward {statistics.median(fb):.3f}s, "
        f"optimizer {statistics.median(opt):.3f}s); "
        f"trained tokens/s median {statistics.median(rates):,.0f}"
    )
    if cuda:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
