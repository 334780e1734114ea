"""``pope model pretrain``: the base model of the POPE-vs-GRPO experiment, trained from scratch.

    pope model pretrain --out runs/base-model [--steps 2700] [--seed 0] [--from DIR] [--lr 1e-3]

Supervised learning on easy material only (the task: experiments/chains.py; material
MATERIAL_VERSION, which made the repository's base, data/base-model): the whole
solution, key step included, for short chains (EASY_SIZES), also continued from any part of
their path; at every length (ALL_SIZES), the path's end half at most written after the rest
of it was given, and the routine after a whole given path. Given parts come as POPE's guided
prompt (the partial solution in the user message), and the answer *restates* the given part
before it goes on, so a guided answer is the whole solution, written from its first token,
the same text an unguided answer is. An unguided long chain's path is never written from
its start, so the model solves easy problems, and hard ones rarely unless given part of the
path. Prompts are built by the rollout service's own template, so the model meets exactly
the text the pipeline sends. Paths of the hard train and eval splits never appear.

Prints progress (loss, steps/s, time left) and ends with accuracy on easy and hard
problems, unhinted and hinted, written to ``<out>/pretrain_report.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import torch

from experiments.chains import ALL_SIZES, EASY_SIZES, TASK_VERSION, Instance, hard_splits, make, solved
from services.common import malloc
from services.common.messages import Problem, Variant
from services.engine.tiny_model import IM_END, TinyModelSpec, build_tiny_model
from services.rollout.prompts import PromptTemplate, prompt_ids, user_message

SPEC = TinyModelSpec(
    vocab_size=640,
    hidden_size=128,
    intermediate_size=384,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    max_positions=1024,
)
MIX = (0.30, 0.15, 0.25, 0.30)
"""Shares of the material: whole short solutions; short solutions continued from part of the
path; solutions of any length finished from up to half their path (links_left); the
routine after a whole path at any length. Every guided answer restates what it was given,
so a hinted rollout writes the same text an unguided attempt does."""


def links_left(n: int) -> range:
    """How many links a "finish" example of an n-link chain leaves to work out: up to half
    the path (its end half), always ending on the end node the problem names, so the model
    learns to stop by content and to look up links from the middle of a long chain on, but
    never works out a long chain's path from its start (it only restates a given start).
    Leaving less than half (a third, one or two links) gave bases that fail in ways hints
    cannot teach across (docs/experiments/history.md)."""
    return range(1, max(1, n // 2) + 1)


MATERIAL_VERSION = "chains-sft-v3"
# The experiment's prompt template (configurable and versioned like any): short words, so
# the tiny model's compute goes to the task, not to reading an instruction.
TEMPLATE = PromptTemplate(
    version="chains-v1",
    plain_instruction="Answer in \\boxed{}.",
    hint_instruction="Copy the partial solution and finish it.",
    hint_header="Partial solution:",
)


def hinted_problem(inst: Instance, given: int | None = None) -> Problem:
    """The problem with the path up to its first ``given`` links as the hint (all by default)."""
    hint = inst.key_step if given is None else inst.partial_key_step(given)
    return inst.problem("train").model_copy(update={"hint": hint})


class Example(NamedTuple):
    """One piece of pretraining material: the user message and the answer (the loss is on the answer)."""

    user: str
    completion: str


def examples(rng: random.Random, exclude: set[tuple[int, ...]]) -> Example:
    """One piece of pretraining material (MIX): the whole solution of a short chain; a short
    chain's solution after part of its path was given (as POPE's shorter hints give it); any
    chain's after all but its end half (up to half its links) was given; or the routine
    after a whole given path, at any length. A guided answer is the whole solution: it
    restates the given part and goes on."""
    while True:
        kind = rng.choices(("full", "partial", "finish", "routine"), weights=MIX)[0]
        inst = make(rng, rng.choice(EASY_SIZES if kind in ("full", "partial") else ALL_SIZES))
        if inst.key not in exclude:
            break
    n = inst.size
    if kind == "full":
        return Example(user_message(inst.problem("train"), Variant.UNHINTED, TEMPLATE), inst.solution)
    given = {
        "partial": lambda: rng.randrange(n),
        "finish": lambda: n - rng.choice(links_left(n)),
        "routine": lambda: n,
    }[kind]()
    return Example(user_message(hinted_problem(inst, given), Variant.HINTED, TEMPLATE), inst.solution)


def material_row(tokenizer: Any, e: Example, end: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one example: the chat up to the answer (no loss), then
    the answer and ``end`` (the loss)."""
    return prompt_ids(tokenizer, e.user), [*tokenizer.encode(e.completion, add_special_tokens=False), end]


Rows = list[tuple[list[int], list[int]]]
"""(prompt ids, completion ids) per example, as ``material_row`` makes them."""


def material(tokenizer: Any, seed: int, batch: int) -> Iterator[Rows]:
    """The pretraining stream, one step's ``batch`` rows at a time: seed ``seed``'s draw of
    ``examples`` with every path of the hard train and eval splits left out."""
    end = tokenizer.convert_tokens_to_ids(IM_END)
    train, held_out = hard_splits()
    exclude = {i.key for i in train + held_out}
    rng = random.Random(seed)
    while True:
        yield [material_row(tokenizer, examples(rng, exclude), end) for _ in range(batch)]


def corpus(n: int = 3000) -> list[str]:
    rng = random.Random(0)
    return [e.user + "\n" + e.completion for e in (examples(rng, set()) for _ in range(n))]


def sft_batch(rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids, completion ids) rows -> input ids, attention mask, labels [B, L] (loss on
    completions only; right-padded)."""
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        attn[i, : len(p) + len(t)] = 1
        labels[i, len(p) : len(p) + len(t)] = torch.tensor(t)
    return ids, attn, labels


MICRO_BATCHES = 3
"""On a CPU, a step's rows, sorted by length, go through the model in this many parts, each
padded to its own longest row rather than the batch's (sft_backward): 3 parts are about
1.5 times as fast as one padded batch on 2 cores, and more parts pad less but run smaller
matrix products (bench/pretrain.py; docs/benchmarks.md). On CUDA a step of this tiny model
is bound by kernel launches, not by padded compute, so it runs in one part there (not
measured)."""


def sft_backward(model: Any, rows: Rows, micro_batches: int = MICRO_BATCHES) -> float:
    """Accumulate in ``model`` the gradient of the batch's loss, the mean cross-entropy over
    all its completion tokens, and return that loss: the same loss and gradient (up to float
    rounding; test) as one right-padded batch of ``rows`` through HF's loss, for less compute.
    The rows, sorted by length, go in ``micro_batches`` parts, each padded to its own longest
    row; with no attention mask, as under right padding and causal attention no real token
    sees a pad (the positions are the same); and the LM head only where there is a label.
    Each part's summed loss is divided by the whole batch's count of completion tokens."""
    rows = sorted(rows, key=lambda r: len(r[0]) + len(r[1]))
    tokens = sum(len(t) for _, t in rows)
    parts = max(1, min(micro_batches, len(rows)))
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for j in range(parts):
        ids, _, labels = sft_batch(rows[j * len(rows) // parts : (j + 1) * len(rows) // parts])
        hidden = model.model(input_ids=ids.to(device)).last_hidden_state[:, :-1]
        targets = labels[:, 1:].to(device)  # position t predicts token t + 1
        scored = targets != -100
        logits = model.lm_head(hidden[scored]).float()
        loss = torch.nn.functional.cross_entropy(logits, targets[scored], reduction="sum") / tokens
        loss.backward()
        total += loss.detach()
    return float(total)


@torch.no_grad()
def accuracy(
    model: Any, tokenizer: Any, cases: list[tuple[str, Instance]], temperature: float = 0.0, max_new_tokens: int = 96
) -> float:
    """Share of cases solved (greedy by default), with the task's exact checker."""
    model.eval()
    tokenizer.padding_side = "left"
    hits = 0
    for i in range(0, len(cases), 32):
        chunk = cases[i : i + 32]
        texts = [tokenizer.decode(prompt_ids(tokenizer, q)) for q, _ in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature or None,
            top_p=None,
            top_k=None,
        )
        for row, (_, inst) in zip(out, chunk, strict=True):
            hits += solved(tokenizer.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True), inst)
    return hits / len(cases)


def report(model: Any, tokenizer: Any, n: int = 200) -> dict[str, float]:
    """Accuracy (greedy) on easy and held-out hard problems, unhinted and hinted."""
    rng = random.Random(99)
    easy = [make(rng, rng.choice(EASY_SIZES)) for _ in range(n)]
    _, hard = hard_splits()
    hard = hard[:n]

    def plain(insts: list[Instance]) -> list[tuple[str, Instance]]:
        return [(user_message(i.problem("eval"), Variant.UNHINTED, TEMPLATE), i) for i in insts]

    def hinted(insts: list[Instance]) -> list[tuple[str, Instance]]:
        return [(user_message(hinted_problem(i), Variant.HINTED, TEMPLATE), i) for i in insts]

    def given(insts: list[Instance], links: Callable[[Instance], int]) -> list[tuple[str, Instance]]:
        """Hinted with the first ``links(instance)`` links of each path given."""
        return [(user_message(hinted_problem(i, links(i)), Variant.HINTED, TEMPLATE), i) for i in insts]

    return {
        "easy_unhinted": accuracy(model, tokenizer, plain(easy)),
        "easy_hinted": accuracy(model, tokenizer, hinted(easy)),
        "hard_unhinted": accuracy(model, tokenizer, plain(hard)),
        "hard_hinted": accuracy(model, tokenizer, hinted(hard)),
        "hard_half_key_step": accuracy(model, tokenizer, given(hard, lambda i: i.eval_links)),
        "hard_end_third_left": accuracy(model, tokenizer, given(hard, lambda i: i.size - i.size // 3)),
    }


STEPS = 2700
"""Pretraining length, in steps rather than wall-clock time, so the base model is a function
of the code and the seed alone (11.1 minutes on 2 cores: docs/benchmarks.md)."""


def check_settings(out: Path, steps: int, lr: float, start: Path | None) -> None:
    """ValueError, saying what to change, for settings ``pretrain`` cannot run with."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if lr <= 0:
        raise ValueError(f"--lr must be positive, got {lr}")
    if start is not None and not (start / "config.json").exists():
        raise ValueError(f"--from {start}: not a model directory (no config.json)")
    if start is not None and out.resolve() == start.resolve():
        raise ValueError(
            f"--from and --out are both {start}: pretraining goes on from a model into a new "
            "directory; write the new model elsewhere"
        )


def pretrain(
    out: Path,
    steps: int | None = None,
    seed: int = 0,
    batch: int = 32,
    lr: float = 1e-3,
    log: TextIO | None = None,
    report_problems: int = 200,
    device: str = "cpu",
    start: Path | None = None,
    keep_freed_memory: bool = True,
) -> dict[str, Any]:
    """Train the base model for ``steps`` steps (cosine learning rate over the steps) into
    ``out``, from scratch or on from the model (and tokenizer) in ``start``; deterministic
    for a given code, seed and start on one kind of machine with the same number of torch
    threads (float sums can round differently on another machine or on CUDA). The model
    trains in float32 on ``device`` and is saved from the CPU. ``keep_freed_memory`` sets
    glibc's malloc to keep freed memory for the next step (services/common/malloc.py;
    False only to measure without it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def say(text: str) -> None:
        print(f"[pretrain] {text}", file=log, flush=True)

    steps = STEPS if steps is None else steps
    check_settings(out, steps, lr, start)
    if keep_freed_memory:
        malloc.keep_freed_memory()
    torch.manual_seed(seed)
    start_sha = weights_sha256(start) if start is not None else ""
    if start is None:
        build_tiny_model(out, SPEC, corpus=corpus(), init_std=0.02)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for f in start.iterdir():  # the model and its tokenizer, not what describes the start
            if f.is_file() and f.name != "README.md" and not f.name.startswith("pretrain_report"):
                shutil.copy(f, out / f.name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model: Any = AutoModelForCausalLM.from_pretrained(out)
    model.to(device)
    stream = material(tokenizer, seed, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    started, losses = time.monotonic(), []
    say(
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {steps} steps of {batch}; "
        f"task {TASK_VERSION}, material {MATERIAL_VERSION}, seed {seed}, learning rate {lr}"
        + (f", from {start} (sha256 {start_sha[:12]})" if start_sha else ", from scratch")
    )
    model.train()
    for step in range(1, steps + 1):
        for group in opt.param_groups:  # cosine over the steps
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        losses.append(sft_backward(model, next(stream), MICRO_BATCHES if model.device.type == "cpu" else 1))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 100 == 0:
            elapsed = time.monotonic() - started
            say(
                f"step {step}/{steps}: loss {sum(losses[-100:]) / 100:.4f}, {step / elapsed:.1f} steps/s, "
                f"{(steps - step) * elapsed / step / 60:.1f} min left"
            )
    model.eval()
    model.to("cpu").save_pretrained(out, safe_serialization=True)
    model.to(device)
    say(f"trained {steps} steps in {(time.monotonic() - started) / 60:.1f} min; evaluating (greedy)")
    acc = report(model, tokenizer, report_problems)
    result = {
        "task": TASK_VERSION,
        "material": MATERIAL_VERSION,
        "steps": steps,
        "minutes": (time.monotonic() - started) / 60,
        "final_loss": sum(losses[-100:]) / max(len(losses[-100:]), 1),
        "accuracy": acc,
        "weights_sha256": weights_sha256(out),
        "spec": SPEC.__dict__,
        "seed": seed,
        "device": device,
        "lr": lr,
        "start": None if start is None else {"path": str(start), "weights_sha256": start_sha},
    }
    (out / "pretrain_report.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, value in acc.items():
        say(f"{name:>15}: {value:.1%}")
    say(f"weights sha256 {result['weights_sha256']}")
    return result


def weights_sha256(model_dir: Path) -> str:
    """The sha256 of a model directory's weights (two pretrainings of one commit and seed match)."""
    h = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()
