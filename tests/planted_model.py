"""A tiny model taught exact answers to exact prompts: a model whose behaviour a test knows.

The hint-search and evaluation tests need to know which prompts a model solves. This
fine-tunes the random tiny model (services/engine/tiny_model.py) by supervised learning
until it answers each given user message with its given completion, e.g. a correct
``\\boxed{42}`` for a guided prompt whose partial solution is long enough and "I do not
know." for shorter ones. Sampling at the training temperature then reproduces those
answers (the targets are learned to near-certainty), so a problem is solvable exactly
from the planted prefix length on. About 20 seconds on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

WRONG = "I do not know."


def train_planted_model(
    out: Path, answers_for: Callable[[Any], dict[str, str]], steps: int = 300, seed: int = 0
) -> Path:
    """Build the tiny model at ``out`` and teach it ``answers_for(tokenizer)`` (user message ->
    completion; the tokenizer is the model's, for callers that cut text by tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments.pretrain import sft_batch
    from services.engine.tiny_model import IM_END, build_tiny_model
    from services.rollout.prompts import prompt_ids

    build_tiny_model(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    end = tokenizer.convert_tokens_to_ids(IM_END)
    torch.manual_seed(seed)
    answers = answers_for(tokenizer)
    rows = [
        (prompt_ids(tokenizer, q), [*tokenizer.encode(a, add_special_tokens=False), end]) for q, a in answers.items()
    ]
    ids, attn, labels = sft_batch(rows)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, attention_mask=attn, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out
