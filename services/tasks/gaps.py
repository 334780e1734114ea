"""A synthetic task family whose hard instances need a key first step: *sorted gaps*.

    Problem:  Sort these numbers, then give the gaps between neighbours: 47 12 58 35
    Solution: Largest: 58                      <- the key first step (several tokens)
              Sorted: 12 35 47 58
              Gaps: 35-12=23 47-35=12 58-47=11 <- routine: one subtraction per neighbour pair
              So the answer is \\boxed{231211}  <- the gaps, two digits each, as one number

Difficulty is a property of the instance, not of a model: sorting n numbers takes n
tokens each of which depends on the whole list, while each gap depends on two adjacent
numbers only. The routine is written out (``58-47=11``), so the key step is under a quarter
of the solution and POPE's hint search (prefixes up to 25%) can reach all of it. A base
model taught the routine at every size but the sort only on small lists (``pope model
pretrain``) solves small instances and rarely large ones, unless the sorted list (or its
start) is given, as POPE's hint gives it. The answer is every gap at
once, so guessing succeeds with probability about 50^-(n-1) (n >= 6: below 1e-8), and it
is a plain number in ``\\boxed{}``, so the normal verifier scores it.

Splits are fixed by seeds and disjoint (no list appears in two splits); ``TASK_VERSION``
changes whenever anything here does, so every result names the exact task it ran on.
v1 (numbers to 99, unpadded gaps) gave a base model whose sampled hinted answers were
almost never exact (README); v2 shrinks the numbers and pads the gaps. v2's base model
sorted the start of a long list right but stopped after as many numbers as its short
training lists had, and treated any given partial sort as finished, so no hint shorter
than the whole sort ever worked and hinted training could not reach the sort; v3 states
the largest number first, so where the sorted list ends is written in the solution.
(v4, hard by its numbers rather than its length, was tried with two curricula and
dropped before any comparison: neither base model could use a hint on hard numbers; README.)
v3, compared against GRPO, showed no transfer: at 7-8 numbers, four past the longest sort
the base model was taught, it could not continue any given part of a sort, so the only
working hint was the whole sort and hinted training practised only the routine. v5 makes
hard lists two and three numbers longer than the taught ones (6-7), and its material
(gaps-sft-v3) finishes sorts of every length from their last one or two numbers, so a
hint of part of the sort is something the base model can continue. (At 5 numbers that
model solved 2.6% of samples unhinted, so 5 is not hard for it.) Compared, v5 showed no
transfer with either material 3 or 4 (README): every working hint holds the sort's start,
which an unhinted attempt gets wrong and hinted rollouts never write.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

from services.common.messages import Problem
from services.tasks.splits import distinct, train_and_held_out

TASK_VERSION = "sorted-gaps-v5"
EASY_SIZES = (3, 4)
"""List lengths whose sort the base model is taught (easy instances)."""
HARD_SIZES = (6, 7)
"""List lengths of the hard split: the sort is never shown at these lengths in pretraining."""
LOW, HIGH = 10, 59
"""Numbers are distinct integers in [10, 59] (v1: [10, 99]; a smaller subtraction table)."""
SEEDS = {"train": 1001, "eval": 2002, "pretrain": 3003}


@dataclass(frozen=True)
class Instance:
    numbers: tuple[int, ...]

    @property
    def sorted(self) -> tuple[int, ...]:
        return tuple(sorted(self.numbers))

    @property
    def key(self) -> tuple[int, ...]:
        """What makes two instances the same problem (for disjoint splits): the sorted list."""
        return self.sorted

    @property
    def gaps(self) -> tuple[int, ...]:
        s = self.sorted
        return tuple(b - a for a, b in itertools.pairwise(s))

    @property
    def prompt(self) -> str:
        return "Sort these numbers, then give the gaps between neighbours: " + " ".join(map(str, self.numbers))

    @property
    def key_step(self) -> str:
        return f"{self.largest_line}\nSorted: " + " ".join(map(str, self.sorted))

    @property
    def largest_line(self) -> str:
        """The sort's first line (v3): where the sorted list ends, so a model can stop by
        content (the largest number written) rather than by the lengths it has seen."""
        return f"Largest: {max(self.numbers)}"

    def partial_key_step(self, given: int) -> str:
        """The key step up to its first ``given`` sorted numbers (a hint shorter than the sort)."""
        return f"{self.largest_line}\nSorted:" + "".join(f" {x}" for x in self.sorted[:given])

    @property
    def routine(self) -> str:
        s = self.sorted
        # Two digits each (v1 wrote 3, not 03), so the answer is a plain copy of these results.
        return "Gaps: " + " ".join(f"{b}-{a}={b - a:02d}" for a, b in itertools.pairwise(s))

    @property
    def answer(self) -> str:
        """The gaps, two digits each, as one number (leading zeros drop: the value is compared)."""
        return str(int("".join(f"{g:02d}" for g in self.gaps)))

    @property
    def solution(self) -> str:
        return f"{self.key_step}\n\n{self.routine}\n\nSo the answer is \\boxed{{{self.answer}}}"

    def problem(self, split: str) -> Problem:
        return Problem.model_validate(
            {
                "prompt": self.prompt,
                "answer": self.answer,
                "solution": self.solution,
                "split": split,
                "source": TASK_VERSION,
            }
        )


def make(rng: random.Random, n: int) -> Instance:
    return Instance(tuple(rng.sample(range(LOW, HIGH + 1), n)))


def instances(
    split: str, count: int, sizes: tuple[int, ...] = HARD_SIZES, exclude: frozenset[tuple[int, ...]] = frozenset()
) -> list[Instance]:
    """``count`` distinct instances of ``split`` (its fixed seed), none whose sorted list is in
    ``exclude``; sizes cycle through ``sizes``."""
    return distinct(f"{TASK_VERSION}:{SEEDS[split]}", count, make, sizes, exclude)


def hard_splits(train: int = 400, eval: int = 200) -> tuple[list[Instance], list[Instance]]:
    """The hard train and held-out eval splits, disjoint."""
    return train_and_held_out(instances, train, eval)


def parse_numbers(prompt: str) -> Instance:
    """The instance a prompt of this task states (for checkers and reports)."""
    match = re.search(r"neighbours:((?:\s+\d+)+)\s*$", prompt)
    if match is None:
        raise ValueError(f"not a {TASK_VERSION} prompt: {prompt[:80]!r}")
    return Instance(tuple(int(x) for x in match.group(1).split()))


def solved(completion: str, inst: Instance) -> bool:
    """The exact check, without the verifier: the last boxed number equals the answer."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    return bool(boxed) and boxed[-1].strip().lstrip("0") == inst.answer.lstrip("0")
