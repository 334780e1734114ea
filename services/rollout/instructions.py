"""Answer-format instructions that datasets put inside their prompts, and taking them out.

DAPO-Math-17k wraps every problem in its own instruction: a sentence before it asking for
a last line ``Answer: $Answer``, and a reminder after it. The project's template
(prompts.py) adds its own instruction, asking for ``\\boxed{}``; left in, the two
conflict. ``pope data import --strip-instruction dapo`` removes DAPO's wording (also its
``Answer: \\boxed{$Answer}`` variant); ``verl-math`` and ``verl-gsm8k`` remove the sentence
verl's preprocessing scripts append to each question; ``--strip-pattern REGEX`` removes
every match of a regular expression, for other datasets. A row where a part is not found
keeps its text (less the parts that were found) and is reported.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    name: str
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class Instruction:
    name: str
    parts: tuple[Part, ...]

    def strip(self, text: str) -> tuple[str, list[str]]:
        """``text`` without every match of every part, trimmed; and the parts not found in it."""
        missing = []
        for part in self.parts:
            text, found = part.pattern.subn("", text)
            if not found:
                missing.append(part.name)
        return text.strip(), missing


DAPO = Instruction(
    "dapo",
    (
        Part(
            "prefix",
            re.compile(
                r"\A\s*Solve the following math problem step by step\.\s+The last line of your response should "
                r"be of the form Answer: (?:\$Answer \(without quotes\)|\\boxed\{\$Answer\}) where \$Answer is "
                r"the answer to the problem\.\s*"
            ),
        ),
        Part("suffix", re.compile(r'\s*Remember to put your answer on its own line after "Answer:"\.\s*\Z')),
    ),
)
# verl's preprocessing scripts (examples/data_preprocess/) append one sentence to the question.
VERL_MATH = Instruction(
    "verl-math",
    (Part("suffix", re.compile(r"\s*Let's think step by step and output the final answer within \\boxed\{\}\.\s*\Z")),),
)
VERL_GSM8K = Instruction(
    "verl-gsm8k",
    (Part("suffix", re.compile(r"""\s*Let's think step by step and output the final answer after "####"\.\s*\Z""")),),
)
PRESETS = {i.name: i for i in (DAPO, VERL_MATH, VERL_GSM8K)}


def instruction(preset: str | None, patterns: Sequence[str] = ()) -> Instruction | None:
    """The preset's parts, then one part per regular expression; None when neither is given."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"no instruction preset {preset!r} (presets: {', '.join(PRESETS)})")
    parts = list(PRESETS[preset].parts) if preset else []
    for text in patterns:
        try:
            parts.append(Part(f"pattern {text!r}", re.compile(text)))
        except re.error as exc:
            raise ValueError(f"--strip-pattern {text!r} is not a regular expression: {exc}") from None
    if not parts:
        return None
    name = " + ".join(([preset] if preset else []) + [f"pattern {t!r}" for t in patterns])
    return Instruction(name, tuple(parts))
