"""Trainer step throughput and MFU on a randomly initialised Qwen3, on CUDA or CPU.

    .venv/bin/python bench/gpu_trainer.py                  # CUDA if present: Qwen3-0.6B shape
    .venv/bin/python bench/gpu_trainer.py --shape small    # CPU-sized shape
    torchrun --nproc-per-node 1 bench/gpu_trainer.py --shape qwen3-4b --response-len 16384 \
        --pack --layer-checkpointing                       # FSDP2 at world size 1 (N: N GPUs)

Runs the trainer's own step (services/trainer/step.py: token-budget micro-batches, padded
or packed, the GRPO loss, AdamW, LR schedule) on the trainer's own policy (policy.py: one
process, or FSDP2 per decoder layer under torchrun, bf16 mixed precision on CUDA) on
synthetic on-policy groups, and prints the median step time and its parts, trained
tokens/s, and MFU: model FLOPs per second over the GPU's peak (``--peak-tflops``, by
default the dense bf16 peak of a known GPU). Model FLOPs count the matmuls a step needs, 6
per weight of every linear layer (LM head included) per token, plus causal attention's
6 x layers x heads x head_dim x length^2 per sequence; layer recomputation is not counted
(it is work the model does not need). No weights are downloaded.
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
from services.trainer.plan import QWEN3_4B_CONFIG
from services.trainer.settings import TrainerSettings
from services.trainer.step import lr_lambda, train_step

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-4B's config.json as the memory plan has it (less what this bench sets itself)
    "qwen3-4b": {
        k: v
        for k, v in QWEN3_4B_CONFIG.items()
        if k not in ("architectures", "model_type", "max_position_embeddings", "torch_dtype")
    },
    # Qwen3-0.6B: 28 layers, hidden 1024, 16 heads (8 KV), head_dim 128, MLP 3072, vocab 151936
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


# Dense bf16 peaks (TFLOP/s) from the vendors' data sheets, by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def model_flops(model: Any, lengths: list[int]) -> float:
    """The matmul FLOPs one training step (forward + backward) needs on rows of ``lengths``."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * sum(n * n for n in lengths)
    return 6.0 * linear * sum(lengths) + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), help="default: qwen3-0.6b on CUDA, small on CPU")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=1024)
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--pack", action="store_true", help="packed micro-batches (trainer.pack_sequences)")
    parser.add_argument("--layer-checkpointing", action="store_true", help="recompute decoder layers")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak (default: a known GPU's bf16)")
    args = parser.parse_args()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from services.trainer.policy import Logprobs, place
    from services.trainer.world import join, leave

    cuda = torch.cuda.is_available()
    shape = args.shape or ("qwen3-0.6b" if cuda else "small")
    if not cuda:
        torch.set_num_threads(1)
        args.prompt_len, args.response_len = min(args.prompt_len, 64), min(args.response_len, 128)
    world = join("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    config = Qwen3Config(**SHAPES[shape], max_position_embeddings=args.prompt_len + args.response_len)
    cfg = TrainerSettings(
        device=world.device,
        bf16=cuda,
        prompts_per_step=args.groups,
        group_size=args.group_size,
        micro_batch_tokens=args.micro_batch_tokens,
        learning_rate=1e-6,
        max_new_tokens=args.response_len,
        pack_sequences=args.pack,
        layer_checkpointing=args.layer_checkpointing,
    )
    lm: Any = Qwen3ForCausalLM(config)
    if cfg.layer_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flops_model = lm
    net = place(Logprobs(lm), cfg, world)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    data = groups(args.groups, args.group_size, args.prompt_len, args.response_len, config.vocab_size)
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for g in data for s in g.samples]
    flops = model_flops(flops_model, lengths)  # the whole step's, over every rank
    params = sum(p.numel() for p in lm.parameters())  # (a DTensor counts its global size)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if world.leader:
        how = f"FSDP2 over {world.size}" if world.distributed else "one process"
        print(
            f"{shape} ({params / 1e6:.0f}M params) on {name}, {how}{', bf16' if cfg.bf16 else ''}"
            f"{', packed' if args.pack else ', padded'}{', layer checkpointing' if args.layer_checkpointing else ''}: "
            f"{args.groups} groups x {args.group_size} samples, prompt {args.prompt_len} + response "
            f"{args.response_len} tokens, micro-batch budget {args.micro_batch_tokens} tokens"
        )
    times, rates, fb, opt = [], [], [], []
    for step in range(args.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        stats = train_step(net, None, optimizer, scheduler, data, cfg, 0, 0, world)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if step == 0:
            continue  # warm-up
        times.append(elapsed)
        rates.append(sum(lengths) / elapsed)
        fb.append(stats["time_forward_backward_s"])
        opt.append(stats["time_optimizer_s"])
    step_s = statistics.median(times)
    if world.leader:
        mfu = flops / step_s / (peak * 1e12 * world.size) if peak else None
        print(
            f"step time median {step_s:.3f}s (forward+backward {statistics.median(fb):.3f}s, "
            f"optimizer {statistics.median(opt):.3f}s); tokens/s median {statistics.median(rates):,.0f} "
            f"({statistics.median(rates) / world.size:,.0f} per rank); model TFLOP/s per rank "
            f"{flops / step_s / world.size / 1e12:.1f}; "
            + (f"MFU {mfu:.1%} of {peak:.0f} TFLOP/s" if mfu is not None else "MFU: no peak known (--peak-tflops)")
        )
        if cuda:
            print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (rank 0)")
    leave(world)


if __name__ == "__main__":
    main()
