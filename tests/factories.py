"""Builders of valid messages for tests, and a tiny handler that publishes a result."""

from __future__ import annotations

from services.common.keys import Keys
from services.common.messages import HintSearch, ProblemLabel, RawGroup, Sample, Score, ScoredGroup, Variant
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
