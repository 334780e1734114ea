"""Packed (``trainer.pack_sequences``) and shared-prompt (``trainer.share_prompts``) against
padded micro-batches: the share of padding the packed layout removes, the positions the
shared layout computes, and one trainer step's time in each layout on the CPU.

    .venv/bin/python bench/packing.py [--repeats 3] [--skip-timing] [--model data/base-model]
        [--logits-chunk-tokens 4096] [--mix demo]

Two length mixes of one step's rows:
- demo: the demo's shape (experiments/demo.py: 8 groups of 8, max_new_tokens 96, half the
  groups hinted) with its real prompts (link-chains train instances through the chains
  prompt template and the base model's tokenizer, data/base-model) and synthetic response
  lengths: the reference solution's token count x U(0.6, 1.4), capped at 96 (truncated).
- long-tail: 64 rows, prompts U(40, 200) tokens, responses lognormal (median 300 tokens,
  sigma 1.0) capped at 4096: most rows short, a few at the cap.

Padding share = pad tokens / all tokens of the padded layout (rows x longest row per
micro-batch, ``micro_batches``); the packed layout (``pack_micro_batches``) holds none. The
attention columns count query-key pairs one forward scores: N x L^2 per padded micro-batch,
S^2 per packed one with a dense block mask (sdpa and eager on the CPU), sum of len^2 with
variable-length kernels. Shared positions = what ``shared_micro_batches`` computes (each
group's prompt once, then its completions). Timing: ``train_step`` on the tiny model (or
``--model``), float32, one torch thread, SGD, micro_batch_tokens 4096; the layouts take
turns step by step in one process (after one warm-up step each), median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.common.messages import FinishReason, Sample, Score, ScoredGroup, Variant
from services.trainer.batch import (
    Row,
    micro_batches,
    pack_micro_batches,
    rows_from_groups,
    shared_micro_batches,
    shared_tokens,
)
from services.trainer.policy import Logprobs
from services.trainer.settings import TrainerSettings
from services.trainer.step import lr_lambda, train_step

ROOT = Path(__file__).resolve().parent.parent
GROUP_SIZE, GROUPS = 8, 8


def demo_lengths(rng: random.Random) -> list[tuple[int, int, bool]]:
    """(prompt, response, truncated) token counts of one demo-shaped step."""
    from transformers import AutoTokenizer

    from experiments import chains
    from services.rollout.prompts import PromptTemplate, prompt_ids, user_message

    tok = AutoTokenizer.from_pretrained(str(ROOT / "data" / "base-model"))
    template = PromptTemplate(
        version="chains-v1",
        plain_instruction="Answer in \\boxed{}.",
        hint_instruction="Copy the partial solution and finish it.",
        hint_header="Partial solution:",
    )  # configs/chains.yaml's
    train, _ = chains.hard_splits()
    out = []
    for g in range(GROUPS):
        inst = rng.choice(train)
        hinted = g % 2 == 0
        problem = inst.problem("train")
        if hinted:
            problem = problem.model_copy(update={"hint": inst.eval_hint})
        variant = Variant.HINTED if hinted else Variant.UNHINTED
        prompt = len(prompt_ids(tok, user_message(problem, variant, template)))
        solution = len(tok(inst.solution)["input_ids"])
        for _ in range(GROUP_SIZE):
            response = round(solution * rng.uniform(0.6, 1.4))
            out.append((prompt, min(response, 96), response > 96))
    return out


def long_tail_lengths(rng: random.Random, cap: int = 4096) -> list[tuple[int, int, bool]]:
    out = []
    for _ in range(GROUPS):
        prompt = rng.randint(40, 200)
        for _ in range(GROUP_SIZE):
            response = max(1, round(rng.lognormvariate(mu=5.7, sigma=1.0)))  # median e^5.7 = 300
            out.append((prompt, min(response, cap), response > cap))
    return out


def groups_of(lengths: list[tuple[int, int, bool]], rng: random.Random) -> list[ScoredGroup]:
    """Scored groups of random tokens with these lengths (one prompt per group of 8)."""
    groups = []
    for g in range(GROUPS):
        part = lengths[g * GROUP_SIZE : (g + 1) * GROUP_SIZE]
        prompt = [rng.randrange(3, 500) for _ in range(part[0][0])]
        samples = [
            Sample(
                problem_id=f"p{g}",
                variant="hinted" if g % 2 == 0 else "unhinted",
                prompt_ids=prompt,
                completion_ids=[rng.randrange(3, 500) for _ in range(n)],
                logprobs=[-6.0] * n,
                finish_reason=FinishReason.LENGTH if truncated else FinishReason.STOP,
                weight_version=0,
                text="",
            )
            for _, n, truncated in part
        ]
        groups.append(
            ScoredGroup(
                group_id=f"g{g}",
                problem_id=f"p{g}",
                variant=samples[0].variant,
                prompt="q",
                answer="1",
                samples=samples,
                weight_version=0,
                step=1,
                temperature=1.0,
                scores=[Score(reward=float(i % 2)) for i in range(GROUP_SIZE)],
            )
        )
    return groups


def layout_counts(rows: list[Row], budget: int) -> dict[str, float]:
    real = sum(len(r.ids) for r in rows)
    padded = [(len(c), max(len(r.ids) for r in c)) for c in micro_batches(rows, budget)]
    packed = [[len(r.ids) for r in c] for c in pack_micro_batches(rows, budget)]
    padded_tokens = sum(n * width for n, width in padded)
    return {
        "tokens": real,
        "padded_tokens": padded_tokens,
        "pad_share": 1 - real / padded_tokens,
        "padded_passes": len(padded),
        "packed_passes": len(packed),
        "attn_padded": sum(n * width * width for n, width in padded),
        "attn_packed_dense": sum(sum(c) ** 2 for c in packed),
        "attn_varlen": sum(n * n for c in packed for n in c),
        "shared_tokens": sum(shared_tokens(c) for c in shared_micro_batches(rows, budget)),
    }


LAYOUTS = {  # name: (pack_sequences, share_prompts)
    "padded": (False, False),
    "packed": (True, False),
    "shared": (False, True),
}


def step_seconds(model: Any, groups: list[ScoredGroup], repeats: int, logits_chunk_tokens: int) -> dict[str, float]:
    """Median seconds of one ``train_step`` per layout, the layouts taking turns."""
    configs = {
        name: TrainerSettings(
            prompts_per_step=GROUPS,
            group_size=GROUP_SIZE,
            max_new_tokens=4096,
            micro_batch_tokens=4096,
            logits_chunk_tokens=logits_chunk_tokens,
            filter_zero_variance=False,
            pack_sequences=pack,
            share_prompts=share,
        )
        for name, (pack, share) in LAYOUTS.items()
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats + 1):  # the first round is a warm-up
        for name, cfg in configs.items():
            m = copy.deepcopy(model)
            opt = torch.optim.SGD(m.parameters(), lr=1e-3)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
            started = time.perf_counter()
            train_step(Logprobs(m), None, opt, sched, groups, cfg, pad_id=0, version=0)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--model", type=Path, help="a model directory to time (default: the tiny model)")
    parser.add_argument("--logits-chunk-tokens", type=int, default=4096)
    parser.add_argument("--mix", choices=("demo", "long-tail"), action="append", help="default: both")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    rng = random.Random(0)
    mixes = {"demo": demo_lengths(rng), "long-tail": long_tail_lengths(rng)}
    model = None
    if not args.skip_timing:
        from transformers import AutoModelForCausalLM

        from services.engine.tiny_model import build_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            path = args.model or build_tiny_model(Path(tmp) / "m")
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    for name, lengths in mixes.items():
        if args.mix and name not in args.mix:
            continue
        groups = groups_of(lengths, rng)
        rows = rows_from_groups(groups, scale_by_std=False, mask_truncated=False)
        longest = max(len(r.ids) for r in rows)
        print(f"{name}: {len(rows)} rows, {sum(len(r.ids) for r in rows)} tokens, longest {longest}")
        for budget in (4096, 16384):
            c = layout_counts(rows, budget)
            print(
                f"  micro_batch_tokens {budget}: padding {c['pad_share']:.1%} of the padded layout's "
                f"{c['padded_tokens']} tokens (packed: 0); passes padded {c['padded_passes']}, packed "
                f"{c['packed_passes']}; attention pairs padded {c['attn_padded']:.3g}, packed dense "
                f"{c['attn_packed_dense']:.3g}, varlen {c['attn_varlen']:.3g}; shared prompts compute "
                f"{c['shared_tokens']} positions"
            )
        if model is not None:
            t = step_seconds(model, groups, args.repeats, args.logits_chunk_tokens)
            print(
                f"  step on CPU (1 thread, micro_batch_tokens 4096, logits_chunk_tokens {args.logits_chunk_tokens}): "
                + ", ".join(f"{k} {v:.3f} s" for k, v in t.items())
            )


if __name__ == "__main__":
    main()
