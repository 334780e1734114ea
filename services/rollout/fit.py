"""Whether a problem fits the model's context, checked when it is submitted.

    context = model_context(settings.model_path)          # config.json's max_position_embeddings
    fit = FitCheck(tokenizer, template, context, budgets, max_fraction=0.25)
    for row, field, message in fit.misfits(problems): ...

A problem fits when its longest prompt, in tokens, plus the response budget of its split
(``max_new_tokens``: training's for ``train``, evaluation's for ``eval``) is at most the
model's context. Its longest prompt is the longest of the chat-templated user messages
(prompts.py) it can be shown: unhinted, hinted with its own hint, and hinted with the
longest hint the hint search could cut from its solution (hints.py: at most
``max_fraction`` of the solution's tokens; counted ``CUT_SLACK`` tokens long). A problem
that does not fit would fail or be truncated on every step that drew it, so it is refused
at the door, not discovered in training.

Without a model (no ``model_path``, or a config.json with no context length) there is
nothing to count tokens with: only the character bounds of ``Problem`` apply.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from services.common.messages import Problem, Variant
from services.rollout.prompts import PromptTemplate, user_message

log = logging.getLogger(__name__)

CUT_SLACK = 2
"""Tokens added to a cut's count when it is counted apart from the prompt it ends (a
token may merge across the join, and a cut may end inside a token)."""

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
"""Where HF configs keep the context length (the first found wins; Qwen, Llama: the first)."""


def model_context(model_path: str | None) -> int | None:
    """The context length in the model directory's config.json (or its ``text_config``),
    None when there is no local model directory or it names none."""
    if not model_path:
        return None
    path = Path(model_path).expanduser() / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    for section in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            value = section.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


class FitCheck:
    """Counts a problem's longest prompt with the model's tokenizer (pure but for it)."""

    def __init__(
        self,
        tokenizer: Any,
        template: PromptTemplate,
        context: int,
        budgets: Mapping[str, int],
        max_fraction: float,
        source: str = "the model's config.json",
    ) -> None:
        self.tokenizer, self.template, self.context = tokenizer, template, context
        self.budgets, self.max_fraction, self.source = budgets, max_fraction, source

    def misfits(self, problems: list[Problem]) -> Iterator[tuple[int, str, str]]:
        """(row, field, why) for every problem of ``problems`` that does not fit."""
        # Most problems fit by a wide margin: a token of the message covers at least one of
        # its UTF-8 bytes (byte-level BPE, SentencePiece), so bytes plus the template's own
        # tokens bound the prompt. Only a problem that bound does not clear is tokenized.
        overhead = self._prompt_lengths([""])[0]
        close = [
            row
            for row, p in enumerate(problems)
            if overhead + max(len(m.encode()) for _, m in self._messages(p, p.solution)) + self.budgets[p.split]
            > self.context
        ]
        # The longest cut is counted as the hinted prompt with an empty hint plus the cut's
        # tokens and CUT_SLACK, so no solution is tokenized twice (nor with offsets).
        solution_tokens = self._lengths([problems[row].solution or "" for row in close])
        messages: list[tuple[int, str, str]] = []  # (row, field to blame, user message)
        for row in close:
            messages += [
                (row, field, m) for field, m in self._messages(problems[row], "" if problems[row].solution else None)
            ]
        lengths = self._prompt_lengths([m for _, _, m in messages])
        cut_tokens = {row: math.floor(self.max_fraction * n) for row, n in zip(close, solution_tokens, strict=True)}
        lengths = [
            n + cut_tokens[row] + CUT_SLACK if field == "solution" else n
            for (row, field, _), n in zip(messages, lengths, strict=True)
        ]
        longest: dict[int, tuple[int, str]] = {}
        for (row, field, _), n in zip(messages, lengths, strict=True):
            if n > longest.get(row, (-1, ""))[0]:
                longest[row] = (n, field)
        for row, (n, field) in sorted(longest.items()):
            budget = self.budgets[problems[row].split]
            if n + budget > self.context:
                shown = {"prompt": "unhinted", "hint": "hinted with its hint"}.get(
                    field, f"hinted with the longest hint the search may cut ({self.max_fraction:g} of the solution)"
                )
                yield (
                    row,
                    field,
                    f"does not fit the model's context: the longest prompt ({shown}) is {n} tokens, plus "
                    f"max_new_tokens {budget} is {n + budget}, over the context of {self.context} tokens "
                    f"(max_position_embeddings, {self.source})",
                )

    def _messages(self, p: Problem, cut: str | None) -> list[tuple[str, str]]:
        """(field to blame, user message) for every prompt ``p`` can be shown: unhinted,
        hinted with its own hint, hinted with ``cut`` of its solution (None: no cut)."""
        out = [("prompt", user_message(p, Variant.UNHINTED, self.template))]
        for field, hint in (("hint", p.hint), ("solution", cut)):
            if hint is not None:
                out.append((field, user_message(p.model_copy(update={"hint": hint}), Variant.HINTED, self.template)))
        return out

    def _lengths(self, texts: list[str]) -> list[int]:
        if not texts:
            return []  # the tokenizer fails on an empty batch
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _prompt_lengths(self, messages: list[str]) -> list[int]:
        """Tokens of each one-turn chat up to the answer (prompts.prompt_ids), batched: the
        template is rendered as text, then the texts tokenized at once."""
        if not messages:
            return []
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": m}], add_generation_prompt=True, tokenize=False
            )
            for m in messages
        ]
        return self._lengths(texts)
