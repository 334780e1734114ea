"""The prompts the policy sees: the plain problem, and the guided (hinted) one.

DESIGN.md 1.3: the guided prompt is problem + instruction + the privileged prefix, all in
the user message; the prefix is prompt text and is never trained on. The template lives
here, in one place, and carries a version that every RawGroup records, so a rollout can
always be traced to the exact words the model was shown.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from services.common.messages import Problem, Variant


class PromptTemplate(BaseModel):
    """The words around a problem; change ``version`` whenever any of them changes."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    version: str = "pope-guided-v1"
    """Recorded in every group as ``template_version``."""
    plain_instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    """Follows the problem in the unhinted variant."""
    hint_instruction: str = (
        "You are given a problem and a partial solution. Study the partial solution and continue "
        "solving from where it ends; put the final answer within \\boxed{}."
    )
    """Follows the problem in the hinted variant, before the partial solution."""
    hint_header: str = "Partial solution:"
    """Introduces the privileged prefix."""


def user_message(problem: Problem, variant: Variant, template: PromptTemplate) -> str:
    """The user message for one variant of a problem (pure)."""
    if variant is Variant.HINTED:
        if problem.hint is None:
            raise ValueError(f"problem {problem.id} has no hint, so it has no hinted variant")
        return f"{problem.prompt}\n\n{template.hint_instruction}\n\n{template.hint_header}\n{problem.hint}"
    return f"{problem.prompt}\n\n{template.plain_instruction}"


def prompt_ids(tokenizer: Any, message: str) -> list[int]:
    """Token ids of a one-turn chat ending where the assistant's answer begins."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True
    )
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]
