"""Sample k completions of one prompt variant and score them: the step that the hint search
and evaluation share (both go through the same engine and verifier as training does).

    attempter = Attempter(engine, verifier, tokenizer, template)
    result = await attempter.attempt(problem, hint=None, k=16, params=params, seed=7)
    result.successes, result.attempts, result.tokens

A truncated sample counts as a failure (it scores 0 in training too). Requests are split
into slices of ``request_n`` copies with consecutive seeds, which are exactly one request
of ``k`` copies: the client sends copy i as its own row with seed + i, so the k samples
differ on SGLang with and without deterministic inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.engine_client import EngineClient, SamplingParams
from services.common.messages import FinishReason, Problem, Variant
from services.common.verifier_client import VerifierClient
from services.rollout.prompts import PromptTemplate, prompt_ids, user_message


@dataclass(frozen=True)
class AttemptResult:
    attempts: int
    successes: int
    tokens: int
    """Completion tokens generated."""
    truncated: int
    weight_versions: frozenset[int]
    """Engine weight versions that produced the samples (a base-model search expects {0})."""


class Attempter:
    def __init__(
        self,
        engine: EngineClient,
        verifier: VerifierClient,
        tokenizer: Any,
        template: PromptTemplate,
        request_n: int = 64,
    ) -> None:
        self.engine, self.verifier, self.tokenizer, self.template = engine, verifier, tokenizer, template
        self.request_n = request_n

    async def attempt(
        self, problem: Problem, *, hint: str | None, k: int, params: SamplingParams, seed: int, rid: str | None = None
    ) -> AttemptResult:
        """``k`` samples of ``problem`` (with ``hint`` as the partial solution, if given), scored."""
        if hint is None:
            text = user_message(problem.model_copy(update={"hint": None}), Variant.UNHINTED, self.template)
        else:
            text = user_message(problem.model_copy(update={"hint": hint}), Variant.HINTED, self.template)
        ids = prompt_ids(self.tokenizer, text)
        outs = []
        for start in range(0, k, self.request_n):
            n = min(self.request_n, k - start)
            sliced = params.model_copy(update={"n": n, "sampling_seed": seed + start})
            outs += await self.engine.generate([ids], sliced, rid=f"{rid}-{start}" if rid else None)
        scores = await self.verifier.verify([(o.text, problem.answer) for o in outs])
        solved = [
            s.reward > 0 and o.finish_reason is not FinishReason.LENGTH for o, s in zip(outs, scores, strict=True)
        ]
        return AttemptResult(
            attempts=len(outs),
            successes=sum(solved),
            tokens=sum(len(o.output_ids) for o in outs),
            truncated=sum(o.finish_reason is FinishReason.LENGTH for o in outs),
            weight_versions=frozenset(o.weight_version for o in outs),
        )
