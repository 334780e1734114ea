"""Answer extraction and scoring with math-verify: the pure part, run inside a worker.

Which text is the answer, and how a gold answer is read, is a *scoring policy*, named and
versioned (``ScoringPolicy``) and recorded with every scored group, so a run says which
rules scored it. docs/verifier.md has the rules with examples and the agreement figures.

``joined-boxes-v2`` (the default):

- **The final answer** is the last ``\\boxed{...}`` (or ``\\fbox``) together with the boxes
  right before it that are joined to it only by "and", "or", commas, semicolons,
  ``\\quad``, math delimiters, part labels ("(b)") or a variable being named ("x =").
  Several joined boxes are one answer, a set, as math-verify reads "1 and 2". Any other
  text between two boxes (the model gave up on the first and went on) leaves only the
  boxes after it: an abandoned attempt never scores.
- **No box**: math-verify's own extraction over the whole completion ("the answer is",
  "final answer:", else the last math in it).
- **The gold** is read as LaTeX math when it is bare ("\\frac{1}{2}", "[0,1)", "1, 2");
  as written when it carries its own ``$...$``, ``\\(...\\)``, ``\\[...\\]`` or
  ``\\boxed{}`` or is a sentence ("The answer is $15$."), since wrapping those in ``$``
  again breaks them.
- **Number formats**, in answers and golds alike: ``{,}`` is a decimal comma
  (``2{,}5`` is 2.5) except before exactly three digits (``1{,}234`` is 1234, the LaTeX
  thousands separator), and ``\\,`` between digit groups of three is a thousands
  separator (``1\\,000\\,000``). A bare "2,5" stays a list, as math-verify reads it.

``last-box-v1`` (runs before the policy was recorded): the last box alone; the gold
wrapped in ``$...$`` whatever it holds; no number-format rules.

math-verify's internal timeouts are off (they use SIGALRM, cannot interrupt C-level
sympy work, and turn a timeout into a silent "wrong"); the pool enforces a hard
wall-clock limit from outside instead (pool.py).
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, TypeVar

from services.common.messages import Score, ScoringPolicy
from services.verifier import guard

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_V = TypeVar("_V")


@dataclass(frozen=True)
class Box:
    content: str
    start: int
    """Where the command starts."""
    end: int
    """Just past the closing brace (or the bare token)."""


def _box_at(text: str, start: int) -> Box | None:
    """The box whose command starts at ``start``; None when it is cut off or empty-bodied."""
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == " ":  # "\boxed 5": up to the next space or "$"
        rest = text[i + 1 :]
        if not rest.strip():
            return None
        token = rest.split("$")[0].split()[0]
        return Box(token, start, text.index(token, i) + len(token))
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return Box(text[i + 1 : j], start, j + 1)
    return None  # unbalanced: the box was cut off (e.g. a truncated response)


def boxes(text: str) -> tuple[list[Box], bool]:
    """Every complete top-level box of ``text``, in order (a box inside a box is part of
    its content), and whether a box command after the last of them is cut off."""
    out: list[Box] = []
    pos, cut = 0, False
    while True:
        found = [i for i in (text.find(cmd, pos) for cmd in _BOX_COMMANDS) if i >= 0]
        if not found:
            return out, cut
        box = _box_at(text, min(found))
        if box is None:  # cut off (or a bare command): look on past it
            pos, cut = min(found) + 1, True
            continue
        out.append(box)
        pos, cut = box.end, False


def last_boxed(text: str) -> str | None:
    """Content of the last top-level box, or None when there is none or it is cut off."""
    found, cut = boxes(text)
    return found[-1].content if found and not cut else None


def _last_box_v1(text: str) -> str | None:
    """``last-box-v1``'s reading: the box whose command comes last (the inner one of a
    nested pair), None when it is cut off."""
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    box = _box_at(text, start) if start >= 0 else None
    return None if box is None else box.content


# What may stand between two boxes of one answer: math delimiters, spacing, the words
# "and"/"or" (bare or in \text{}), commas, semicolons, \quad, a part label, a name being
# given a value ("x =", "x_2=", "a \in"). Anything else is prose: the boxes are separate.
_JOINER = re.compile(
    r"""(?x)
    ( \s | \$ | \\[()\[\]] | , | ; | & | ~ | \\[,;:!\ ]
    | \\q?quad\b | \\(?:text|mbox|textrm|mathrm)\{\s*(?:and|or|,)?\s*\}
    | \b(?:and|or|by)\b | \\times\b
    | \(?(?:[a-h]|i{1,3}|iv|vi{0,3})\)[:.]?                    # (a)  b)  (iii):
    | \\textbf\{\s*\(?(?:[a-h]|i{1,3}|iv|vi{0,3})\)[:.]?\s*\}
    | [A-Za-z](?:_\{?\w+\}?)?\s*(?:=|\\in\b)                    # x =  x_2=  a \in
    )*"""
)


_MAX_JOINER_GAP = 120
"""Longer text between two boxes is never only joiners (and is not matched at all)."""

_PART_LABEL_LINE = re.compile(r"(?m)^[\s*#>_]*(?:\\textbf\{\s*)?(?:Part\s+)?\((?:[a-h]|i{1,3}|iv|vi{0,3})\)")
"""A line that starts a labelled part: "(b) ...", "**(b)** ...", "Part (b): ..."."""


def _joined_tail(text: str, found: list[Box]) -> list[Box]:
    """The last box with the boxes right before it that only joiners separate from it."""
    group = [found[-1]]
    for prev in reversed(found[:-1]):
        gap = text[prev.end : group[0].start]
        if len(gap) > _MAX_JOINER_GAP or _JOINER.fullmatch(gap) is None:
            break
        group.insert(0, prev)
    return group


def final_answer(text: str) -> list[str] | None:
    """The boxes that make up the final answer; [] when there is no box, None when the
    last one is cut off (no answer was given).

    In a completion written in labelled parts ("(a) ... (b) ...", two or more of them
    with boxes) each part's own final answer counts; otherwise the last box with the
    boxes joined to it. A box repeated in the group counts once."""
    found, cut = boxes(text)
    if cut:
        return None
    if not found:
        return []
    starts = [m.start() for m in _PART_LABEL_LINE.finditer(text)]
    parts = [[b for b in found if start <= b.start < end] for start, end in pairwise([*starts, len(text)])]
    parts = [p for p in parts if p]
    if len(parts) >= 2 and parts[-1][-1] is found[-1]:
        group = [b for p in parts for b in _joined_tail(text, p)]
    else:
        group = _joined_tail(text, found)
    return list(dict.fromkeys(b.content for b in group))  # "\boxed{1} and \boxed{1}" is 1


_DECIMAL_COMMA = re.compile(r"(?<=\d)\{,\}(?=\d)(?!\d{3}(?!\d))")
_BRACED_THOUSANDS = re.compile(r"(?<=\d)\{,\}(?=\d{3}(?!\d))")
_SPACED_THOUSANDS = re.compile(r"(?<=\d)(?:\\[,;: ]|\{\\,\}|~)(?=\d{3}(?!\d))")


def normalize_numbers(text: str) -> str:
    """Decimal commas and thousands separators LaTeX writes, as plain digits."""
    text = _BRACED_THOUSANDS.sub("", text)
    text = _DECIMAL_COMMA.sub(".", text)
    return _SPACED_THOUSANDS.sub("", text)


_SENTENCE_END = re.compile(r"(?<=\d)\.(?=\s|$)")
"""A full stop right after a number ("... is 3/5."), which would read as a decimal point."""

_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed|\\fbox")
_PROSE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}\s+[A-Za-z]{2,}\b")
_TEXT_BODY = re.compile(r"\\(?:text|mbox|textrm|mathrm|textbf|operatorname)\{[^{}]*\}")
_PART_LABEL = re.compile(r"(?<![\w\\])\((?:[a-h]|i{1,3}|iv|vi{0,3})\)\s*")


def _is_prose(gold: str) -> bool:
    return _PROSE.search(_TEXT_BODY.sub(" ", gold)) is not None


def parse_gold(gold: str, policy: ScoringPolicy = ScoringPolicy.JOINED_BOXES_V2) -> Any:
    """The gold answer, parsed once per group (see the module docstring for how)."""
    from math_verify import parse

    gold = guard.screen_gold(gold)
    if policy is ScoringPolicy.LAST_BOX_V1:
        return parse(f"${gold}$", parsing_timeout=None) or parse(gold, parsing_timeout=None)
    gold = normalize_numbers(gold.strip())
    if _DELIMITED.search(gold) is not None:
        if contents := final_answer(gold):  # a boxed gold is read as a boxed answer would be
            return _parse_boxes(contents)
        return parse(gold, parsing_timeout=None)
    if _is_prose(gold):
        return parse(gold, parsing_timeout=None)
    bare = _PART_LABEL.sub("", gold).rstrip(".")
    return parse(f"${bare}$", parsing_timeout=None) or parse(gold, parsing_timeout=None)


def _parse_boxes(contents: list[str]) -> list[Any]:
    """One answer from one or more boxes: several become a set, as math-verify reads
    "1 and 2" (sets among them are flattened into it); [] when any fails to parse."""
    from math_verify import parse
    from sympy import Basic, FiniteSet

    if len(contents) == 1:
        return list(parse(f"\\boxed{{{contents[0]}}}", parsing_timeout=None))
    exprs: list[Any] = []
    for content in contents:
        parsed = [p for p in parse(f"\\boxed{{{content}}}", parsing_timeout=None) if isinstance(p, Basic)]
        if not parsed:
            return []
        exprs.extend(parsed[0].args if isinstance(parsed[0], FiniteSet) else [parsed[0]])
    return [FiniteSet(*exprs), ", ".join(contents)]


def final_answer_text(text: str) -> str | None:
    """The final answer's boxes as one string (what the guard screens); None when there is
    no complete final box."""
    contents = final_answer(normalize_numbers(text))
    return ", ".join(contents) if contents else None


Judge = Callable[[tuple[str, ...]], Score]
"""The score of a final answer given as its boxes' contents, against one gold."""


def judge_boxes(gold_parsed: Any, contents: tuple[str, ...]) -> Score:
    """The score of the final answer in boxes holding ``contents`` against ``gold_parsed``:
    the expensive part of ``score_answer`` (the parse and the comparison), a pure function
    of the gold and the contents."""
    from math_verify import verify

    parsed = _parse_boxes(list(contents))
    extracted = ", ".join(contents)
    if not parsed:
        return Score(reward=0.0, extracted=extracted)
    if not gold_parsed:
        return Score(reward=0.0, extracted=extracted, error="the gold answer could not be parsed")
    return Score(reward=1.0 if verify(gold_parsed, parsed, timeout_seconds=None) else 0.0, extracted=extracted)


def score_answer(
    gold_parsed: Any,
    completion: str,
    policy: ScoringPolicy = ScoringPolicy.JOINED_BOXES_V2,
    judge: Judge | None = None,
) -> Score:
    """Reward 1 when the completion's final answer equals the gold one, else 0. A boxed
    answer is judged by ``judge`` (``judge_boxes`` against ``gold_parsed`` by default; the
    scoring workers pass one that remembers, ``Scorer``)."""
    from math_verify import parse, verify

    v1 = policy is ScoringPolicy.LAST_BOX_V1
    completion = guard.tail(completion)
    if v1:
        last = _last_box_v1(completion)
        contents: list[str] | None = [] if last is None else [last]
    else:
        completion = normalize_numbers(completion)
        contents = final_answer(completion)
    guard.screen_answer(completion, ", ".join(contents) if contents else None)
    if contents is None:
        return Score(reward=0.0, extracted=None)
    if contents:
        return (judge or functools.partial(judge_boxes, gold_parsed))(tuple(contents))
    parsed = parse(completion if v1 else _SENTENCE_END.sub("", completion), parsing_timeout=None)
    extracted = str(parsed[-1]) if parsed else None
    if not parsed:
        return Score(reward=0.0, extracted=extracted)
    if not gold_parsed:
        return Score(reward=0.0, extracted=extracted, error="the gold answer could not be parsed")
    correct = verify(gold_parsed, parsed, timeout_seconds=None)
    return Score(reward=1.0 if correct else 0.0, extracted=extracted)


class Scorer:
    """``parse_gold`` and ``score_answer`` with memory, for a scoring worker: a run scores
    the same problems step after step, and a group's samples often give the same answer,
    so each gold is parsed once and each (gold, final answer) judged once, the most recently
    used ``size`` of each kept. Both are pure functions of their inputs and the policy; a
    failure (an exception) is not kept."""

    def __init__(self, policy: ScoringPolicy = ScoringPolicy.JOINED_BOXES_V2, size: int = 4096) -> None:
        self.policy, self.size = policy, size
        self._golds: OrderedDict[str, Any] = OrderedDict()
        self._judged: OrderedDict[tuple[str, tuple[str, ...]], Score] = OrderedDict()

    def gold(self, gold: str) -> Any:
        return self._kept(self._golds, gold, lambda: parse_gold(gold, self.policy))

    def score(self, gold: str, gold_parsed: Any, completion: str) -> Score:
        """``completion`` against ``gold`` (parsed: ``gold_parsed``)."""

        def judge(contents: tuple[str, ...]) -> Score:
            return self._kept(self._judged, (gold, contents), lambda: judge_boxes(gold_parsed, contents))

        return score_answer(gold_parsed, completion, self.policy, judge)

    def _kept(self, memo: OrderedDict[Any, _V], key: Any, make: Callable[[], _V]) -> _V:
        if key in memo:
            memo.move_to_end(key)
            return memo[key]
        value = memo[key] = make()
        if len(memo) > self.size:
            memo.popitem(last=False)
        return value
