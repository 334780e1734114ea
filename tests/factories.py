"""Builders of valid messages for tests, and a tiny handler that publishes a result."""

from __future__ import annotations

from services.common.keys import Keys
from services.common.messages import RawGroup, Sample, Score, ScoredGroup, Variant
from services.common.worker import Effects


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


def scoring_handler(keys: Keys):  # type: ignore[no-untyped-def]
    """A stand-in stage: score every sample 0 and publish the ScoredGroup to pope:scored."""

    async def handle(raw: RawGroup, effects: Effects) -> None:
        effects.publish(keys.scored, ScoredGroup.from_raw(raw, [Score(reward=0.0)] * len(raw.samples)))

    return handle
