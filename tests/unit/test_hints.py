"""The hint search's policy: where a solution is cut, and which cut the search picks."""

from __future__ import annotations

import pytest

from services.rollout.hints import cut_points, shortest_working


def char_tokens(text: str) -> list[int]:
    """One token per character: token i ends at offset i + 1."""
    return list(range(1, len(text) + 1))


def test_paragraphs_come_first_and_cuts_stop_at_max_fraction() -> None:
    solution = "Step one.\n\nStep two.\n\nStep three.\n\n" + "x" * 200
    level, cuts = cut_points(solution, char_tokens(solution), max_fraction=0.25)
    assert level == "paragraph"
    assert [solution[: c.chars] for c in cuts] == [
        "Step one.",
        "Step one.\n\nStep two.",
        "Step one.\n\nStep two.\n\nStep three.",
    ]
    assert all(c.fraction <= 0.25 and c.tokens == c.chars for c in cuts)
    # A quarter of the 235 characters allows none of the 200-long tail.
    assert cuts[-1].fraction == pytest.approx(len("Step one.\n\nStep two.\n\nStep three.") / len(solution))


def test_sentences_then_lines_when_paragraphs_are_too_few() -> None:
    solution = "Let x be 3. Then 2x is 6. So y = 3.5 here! Done? " + "z" * 200
    level, cuts = cut_points(solution, char_tokens(solution), max_fraction=0.25)
    assert level == "sentence"
    assert [solution[: c.chars] for c in cuts] == [
        "Let x be 3.",
        "Let x be 3. Then 2x is 6.",
        "Let x be 3. Then 2x is 6. So y = 3.5 here!",
        "Let x be 3. Then 2x is 6. So y = 3.5 here! Done?",
    ]
    lines = "a = 1\nb = 2\nc = 3\n" + "w" * 100
    level, cuts = cut_points(lines, char_tokens(lines), max_fraction=0.25)
    assert level == "line" and [lines[: c.chars] for c in cuts] == ["a = 1", "a = 1\nb = 2", "a = 1\nb = 2\nc = 3"]


def test_token_fallback_and_thinning() -> None:
    solution = "q" * 400  # no boundary at all
    level, cuts = cut_points(solution, char_tokens(solution), max_fraction=0.25, max_cuts=4)
    assert level == "token" and [c.tokens for c in cuts] == [25, 50, 75, 100]
    many = "\n\n".join(f"p{i}" for i in range(60)) + "\n\n" + "t" * 1000
    level, cuts = cut_points(many, char_tokens(many), max_fraction=0.25, max_cuts=5)
    assert level == "paragraph" and len(cuts) == 5
    assert cuts[0].tokens == 2 and cuts == sorted(cuts, key=lambda c: c.tokens)  # shortest kept first


def test_counts_are_in_tokens_not_characters() -> None:
    solution = "aaaa bbbb.\n\ncccc dddd.\n\neeee.\n\n" + "f " * 100
    ends = [i + 1 for i, ch in enumerate(solution) if ch in " \n."]  # a token per word-ish piece
    level, cuts = cut_points(solution, ends, max_fraction=0.25)
    assert level == "paragraph"
    assert [c.tokens for c in cuts] == [sum(e <= c.chars for e in ends) for c in cuts]


@pytest.mark.parametrize("method", ["linear", "galloping"])
@pytest.mark.parametrize("first", [0, 1, 4, 9, None])
async def test_monotone_success_is_found_exactly_by_both_methods(method: str, first: int | None) -> None:
    async def works(i: int) -> bool:
        return first is not None and i >= first

    index, tried = await shortest_working(10, works, method)  # type: ignore[arg-type]
    assert index == first
    assert len(set(tried)) == len(tried)  # each prefix attempted once
    if method == "linear":
        assert tried == list(range((first if first is not None else 9) + 1))


async def test_galloping_tries_fewer_prefixes_but_is_approximate() -> None:
    async def late(i: int) -> bool:
        return i >= 90

    _, linear = await shortest_working(100, late, "linear")
    index, galloping = await shortest_working(100, late, "galloping")
    assert index == 90 and len(linear) == 91 and len(galloping) <= 14

    async def lucky_gap(i: int) -> bool:  # works at 1 but not at 2: not monotone
        return i in (1, 6, 7, 8, 9)

    index, _ = await shortest_working(10, lucky_gap, "galloping")
    assert index == 3 or index == 6  # misses the true shortest, 1, that the linear scan finds
    assert (await shortest_working(10, lucky_gap, "linear"))[0] == 1


def test_a_lone_natural_step_stays_a_candidate_among_token_cuts() -> None:
    """One paragraph under the cap is too few cuts: token counts are added, not swapped in,
    so the prefix that ends exactly at the first step is still tried."""
    solution = "Sorted: 1 2 3 4 5 6 7\n\nGaps: " + "a-b=c " * 40
    level, cuts = cut_points(solution, char_tokens(solution), max_fraction=0.25, max_cuts=8)
    assert level == "token"
    assert "Sorted: 1 2 3 4 5 6 7" in [solution[: c.chars] for c in cuts]
    assert len(cuts) >= 8 and cuts == sorted(cuts, key=lambda c: c.tokens)
