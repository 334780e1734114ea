"""Answer extraction and scoring with math-verify: the pure part, run inside a worker.

The final answer is the content of the *last* ``\\boxed{...}`` (or ``\\fbox{...}``) of the
completion; when there is none, math-verify's own extraction is the fallback. The gold
answer is parsed once per group. math-verify's internal timeouts are off (they use
SIGALRM, cannot interrupt C-level sympy work, and turn a timeout into a silent "wrong");
the pool enforces a hard wall-clock limit from outside instead (pool.py).
"""

from __future__ import annotations

from typing import Any

from services.common.messages import Score
from services.verifier import guard

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` (braces balanced), or of a
    trailing ``\\boxed 5`` form; None when there is no box."""
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == " ":  # "\boxed 5": up to the next space or "$"
        rest = text[i + 1 :]
        return rest.split("$")[0].split()[0] if rest.strip() else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the box was cut off (e.g. a truncated response)


def parse_gold(gold: str) -> Any:
    """Gold answers come bare ("\\frac{1}{2}", "0.5", "[0,1)"): read them as LaTeX math,
    then as a plain expression."""
    from math_verify import parse

    gold = guard.screen_gold(gold)
    parsed = parse(f"${gold}$", parsing_timeout=None)
    return parsed or parse(gold, parsing_timeout=None)


def score_answer(gold_parsed: Any, completion: str) -> Score:
    """Reward 1 when the completion's final answer equals the gold one, else 0."""
    from math_verify import parse, verify

    completion = guard.screen(completion, last_boxed)
    boxed = last_boxed(completion)
    if boxed is not None:
        parsed = parse(f"\\boxed{{{boxed}}}", parsing_timeout=None)
    else:
        parsed = parse(completion, parsing_timeout=None)
    if not parsed:
        return Score(reward=0.0, extracted=boxed)
    extracted = boxed if boxed is not None else str(parsed[-1])
    if not gold_parsed:
        return Score(reward=0.0, extracted=extracted, error="the gold answer could not be parsed")
    correct = verify(gold_parsed, parsed, timeout_seconds=None)
    return Score(reward=1.0 if correct else 0.0, extracted=extracted)
