"""Builders of valid messages for tests, and a tiny handler that publishes a result."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from services.common.keys import Keys
from services.common.messages import (
    FinishReason,
    HintSearch,
    ProblemLabel,
    RawGroup,
    Sample,
    Score,
    ScoredGroup,
    Variant,
)
from services.common.worker import Effects


def hard_hinted_search() -> HintSearch:
    """The record of a search that found a 5-character hint (a fifth of the solution)."""
    return HintSearch(
        label=ProblemLabel.HARD_HINTED,
        unhinted_attempts=8,
        unhinted_successes=0,
        prefix_chars=5,
        prefix_fraction=0.2,
        hinted_successes=1,
        tokens_spent=100,
        method="linear",
        config="c",
        template_version="v1",
    )


def sample(
    problem_id: str = "p1", variant: Variant = Variant.UNHINTED, *, version: int = 0, n_tokens: int = 3
) -> Sample:
    return Sample(
        problem_id=problem_id,
        variant=variant,
        prompt_ids=[1, 2, 3],
        completion_ids=list(range(10, 10 + n_tokens)),
        logprobs=[-0.5] * n_tokens,
        finish_reason="stop",
        weight_version=version,
        text="the answer is \\boxed{4}",
    )


def group(
    group_id: str,
    problem_id: str = "p1",
    variant: Variant = Variant.UNHINTED,
    *,
    size: int = 2,
    version: int = 0,
    step: int = 0,
) -> RawGroup:
    return RawGroup(
        group_id=group_id,
        problem_id=problem_id,
        variant=variant,
        prompt="What is 2+2?",
        answer="4",
        samples=[sample(problem_id, variant, version=version) for _ in range(size)],
        weight_version=version,
        step=step,
        temperature=1.0,
    )


def scored_group(
    samples: list[Sample],
    rewards: list[float],
    *,
    group_id: str = "g",
    temperature: float = 0.8,
    prompt: str = "q",
) -> ScoredGroup:
    """The ScoredGroup around ``samples`` (one problem and variant, sampled by v0, step 1)
    with one reward each: the trainer's input in the GRPO and packing tests."""
    return ScoredGroup(
        group_id=group_id,
        problem_id=samples[0].problem_id,
        variant=samples[0].variant,
        prompt=prompt,
        answer="1",
        samples=samples,
        weight_version=0,
        step=1,
        temperature=temperature,
        scores=[Score(reward=r) for r in rewards],
    )


def scoring_handler(keys: Keys):  # type: ignore[no-untyped-def]
    """A stand-in stage: score every sample 0 and publish the ScoredGroup to pope:scored."""

    async def handle(raw: RawGroup, effects: Effects) -> None:
        effects.publish(keys.scored, ScoredGroup.from_raw(raw, [Score(reward=0.0)] * len(raw.samples)))

    return handle


def random_group(
    rng: random.Random,
    group_id: str,
    problem_id: str,
    variant: str,
    temperature: float | list[float],
    finish: FinishReason,
    vocab: int = 500,
    logprob_range: tuple[float, float] = (4.0, 8.0),
) -> ScoredGroup:
    """A scored group of 4 random samples (prompt 4 to 14 tokens, completions 1 to 30, token
    ids from 3 up to ``vocab``), their logprobs drawn from -``logprob_range`` (far from a tiny
    model's, so ratios clip) and rewards 0 or 1 at even odds; ``temperature``, or one drawn
    from the list after them."""
    prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 14))]
    samples = []
    for _ in range(4):
        completion = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))]
        samples.append(
            Sample(
                problem_id=problem_id,
                variant=variant,
                prompt_ids=prompt,
                completion_ids=completion,
                logprobs=[-rng.uniform(*logprob_range) for _ in completion],
                finish_reason=finish,
                weight_version=0,
                text="",
            )
        )
    rewards = [float(rng.random() < 0.5) for _ in samples]
    if isinstance(temperature, list):
        temperature = rng.choice(temperature)
    return scored_group(samples, rewards, group_id=group_id, temperature=temperature)


def recorded_steps(path: Path, steps: int, groups_per_step: int, seed: int = 0) -> Path:
    """``path``: a ``trainer.record_groups`` file of ``steps`` steps of ``random_group``s
    (hinted and unhinted, temperatures 0.7 to 1.3, one group in four truncated, token ids
    under 400), for ``pope trainer replay``."""
    from services.trainer import replay

    rng = random.Random(seed)
    for step in range(1, steps + 1):
        groups = []
        for i in range(groups_per_step):
            variant = "hinted" if i % 2 else "unhinted"
            finish = FinishReason.LENGTH if i % 4 == 3 else FinishReason.STOP
            temperatures = [0.7, 1.0, 1.3]
            groups.append(random_group(rng, f"s{step}g{i}", f"p{i}", variant, temperatures, finish, 400, (2.0, 7.0)))
        replay.record(path, step, 0, groups)
    return path


def sgd_step(base: Any, cfg: Any, groups: list[ScoredGroup]) -> tuple[dict[str, float], list[Any]]:
    """One train_step on ``groups`` with plain SGD on a fresh copy of ``base`` (a HF causal
    LM; layer checkpointing as ``cfg`` says): its metrics and its (clipped) gradients."""
    import copy

    import torch

    from services.trainer.policy import Logprobs
    from services.trainer.step import lr_lambda, train_step

    torch.manual_seed(0)
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    if cfg.layer_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    metrics = train_step(Logprobs(model), Logprobs(ref), opt, sched, groups, cfg, pad_id=0, version=0)
    return metrics, [p.grad.clone() for p in model.parameters()]


def assert_same_step(padded: tuple[dict[str, float], list[Any]], other: tuple[dict[str, float], list[Any]]) -> None:
    """Two ``sgd_step`` results agree: every gradient, and every metric but the timings."""
    import pytest
    import torch

    (metrics, grads), (their_metrics, their_grads) = padded, other
    assert float(metrics["grad_norm"]) > 0.01
    for a, b in zip(grads, their_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), float((a - b).abs().max())
    assert metrics.keys() == their_metrics.keys()
    for key, value in metrics.items():
        if not key.startswith("time_"):
            assert their_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
