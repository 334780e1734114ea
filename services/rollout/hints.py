"""The hint search's policy, as pure functions (DESIGN.md 1.2): where a solution may be cut,
and which cut is the shortest that works.

    level, cuts = cut_points(solution, token_ends, max_fraction=0.25)
    index, tried = await shortest_working(len(cuts), works, "linear")

A *cut* is a prefix of the oracle solution ending at a step boundary: paragraph ends,
then sentence ends and line ends are added until there are ``min_cuts`` cuts within
``max_fraction`` of the solution's tokens; if there are still too few, evenly spaced token
counts are added to them (the natural cuts always stay candidates).
The search tries prefixes from the shortest up and takes the first with which the model
solves the problem at least once (``works``). The linear scan is the paper's. The
galloping search (probe cuts 0, 2, 6, 14, ..., then bisect between the last failure and
the first success) tries far fewer prefixes on long solutions, but it is approximate:
success is random and not monotone in prefix length, so it can miss a shorter prefix
that works.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

Level = Literal["paragraph", "sentence", "line", "token"]
Method = Literal["linear", "galloping"]

_BOUNDARIES: dict[Level, re.Pattern[str]] = {
    "paragraph": re.compile(r"\n[ \t]*\n"),  # a blank line ends a paragraph
    "sentence": re.compile(r"(?<=[.!?])[\"')\]]*(?=\s)"),  # . ! ? before whitespace (not 3.5)
    "line": re.compile(r"\n"),
}


@dataclass(frozen=True)
class Cut:
    """A candidate hint: ``solution[:chars]``, ``tokens`` tokens long."""

    chars: int
    tokens: int
    fraction: float
    """``tokens`` over the solution's token count."""


def cut_points(
    solution: str, token_ends: list[int], *, max_fraction: float = 0.25, min_cuts: int = 3, max_cuts: int = 16
) -> tuple[Level, list[Cut]]:
    """Candidate prefixes of ``solution``, shortest first, at most ``max_fraction`` of its tokens.

    token_ends: the character offset where each token of ``solution`` ends, in order (from
    the tokenizer's offsets), so a prefix's token count is the number of tokens inside it.
    More than ``max_cuts`` candidates are thinned to ``max_cuts`` evenly spaced ones.
    """
    total = len(token_ends)
    if total == 0:
        return "token", []
    limit = max_fraction * total

    def cut(end: int) -> Cut | None:
        end = len(solution[:end].rstrip())
        tokens = bisect.bisect_right(token_ends, end)
        return Cut(end, tokens, tokens / total) if 0 < tokens <= limit else None

    natural: list[Cut] = []
    for level, pattern in _BOUNDARIES.items():
        ends = [m.end() if level == "sentence" else m.start() for m in pattern.finditer(solution)]
        natural = _distinct([*natural, *(c for c in map(cut, ends) if c is not None)])
        if len(natural) >= min_cuts:
            return level, _thin(natural, max_cuts)
    # Too few natural steps short enough: add evenly spaced token counts up to the limit
    # (the natural cuts stay: a whole first step is often exactly the hint that works).
    n = min(max(max_cuts - len(natural), 1), int(limit))
    counts = sorted({max(1, round(limit * (i + 1) / n)) for i in range(n)}) if n > 0 else []
    extra = [Cut(token_ends[c - 1], c, c / total) for c in counts if c <= limit]
    return "token", _distinct([*natural, *extra])


def _distinct(cuts: Iterable[Cut]) -> list[Cut]:
    """Sorted by length, one cut per token count (two boundaries in one token are one cut)."""
    by_tokens: dict[int, Cut] = {}
    for c in cuts:
        by_tokens.setdefault(c.tokens, c)
    return [by_tokens[t] for t in sorted(by_tokens)]


def _thin(cuts: list[Cut], most: int) -> list[Cut]:
    if len(cuts) <= most:
        return cuts
    picks = sorted({round(i * (len(cuts) - 1) / (most - 1)) for i in range(most)})
    return [cuts[i] for i in picks]


async def shortest_working(
    n: int, works: Callable[[int], Awaitable[bool]], method: Method = "linear"
) -> tuple[int | None, list[int]]:
    """The index of the shortest working cut among ``n`` (None if none works), and the
    indices tried, in order. ``works(i)`` is called at most once per index."""
    tried: list[int] = []
    seen: dict[int, bool] = {}

    async def probe(i: int) -> bool:
        if i not in seen:
            seen[i] = await works(i)
            tried.append(i)
        return seen[i]

    if method == "linear":
        for i in range(n):
            if await probe(i):
                return i, tried
        return None, tried
    last_fail, hit, step = -1, None, 1
    while hit is None:
        i = min(last_fail + step, n - 1)
        if i <= last_fail:
            return None, tried
        if await probe(i):
            hit = i
        else:
            last_fail, step = i, step * 2
    lo, hi = last_fail + 1, hit
    while lo < hi:
        mid = (lo + hi) // 2
        if await probe(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi, tried
