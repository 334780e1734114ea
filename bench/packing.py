"""Packed against padded micro-batches (``trainer.pack_sequences``): the share of padding
the packed layout removes, and one trainer step's time in each layout on the CPU.

    .venv/bin/python bench/packing.py [--repeats 3] [--skip-timing]

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
variable-length kernels. Timing: ``train_step`` on the tiny model, float32, one torch
thread, SGD, median of ``--repeats`` steps after a warm-up, micro_batch_tokens 4096.
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
from services.trainer.batch import Row, micro_batches, pack_micro_batches, rows_from_groups
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
    }


def step_seconds(model: Any, groups: list[ScoredGroup], pack: bool, repeats: int) -> float:
    cfg = TrainerSettings(
        prompts_per_step=GROUPS,
        group_size=GROUP_SIZE,
        max_new_tokens=4096,
        micro_batch_tokens=4096,
        filter_zero_variance=False,
        pack_sequences=pack,
    )
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        started = time.perf_counter()
        train_step(Logprobs(m), None, opt, sched, groups, cfg, pad_id=0, version=0)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    mixes = {"demo": demo_lengths(rng), "long-tail": long_tail_lengths(rng)}
    model = None
    if not args.skip_timing:
        from transformers import AutoModelForCausalLM

        from services.engine.tiny_model import build_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            path = build_tiny_model(Path(tmp) / "m")
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    for name, lengths in mixes.items():
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
                f"{c['attn_packed_dense']:.3g}, varlen {c['attn_varlen']:.3g}"
            )
        if model is not None:
            padded = step_seconds(model, groups, pack=False, repeats=args.repeats)
            packed = step_seconds(model, groups, pack=True, repeats=args.repeats)
            print(f"  step on CPU (1 thread, micro_batch_tokens 4096): padded {padded:.3f} s, packed {packed:.3f} s")


if __name__ == "__main__":
    main()
