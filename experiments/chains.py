"""The link-chains task: synthetic problems of known difficulty whose key step is the same
small computation at every position (the POPE-vs-GRPO experiment's task).

    Problem:  Follow the links from 23 to 52: 41 > 17, 23 > 35, 35 > 41, 17 > 52
    Solution: Path: 23 35 41 17 52                        <- the key step: one lookup per link
              So the answer is \\boxed{(23, 35, 41, 17, 52)}  <- routine: the path as a tuple

Each step of the path is one lookup: find the link that starts at the last node written
and write where it goes. The lookup is the same at every position, so a hinted rollout,
which writes the end of a path from a given start of it, practises exactly what an
unhinted attempt needs at its start.

Difficulty is a property of the instance: a path of n links is right only if all n
lookups are, so a model that gets a lookup right with probability p solves it with about
p^n, and a hint that gives the first h links raises that to p^(n-h). The base model
(``pope model pretrain``) works out whole paths only for short chains (EASY_SIZES); on
longer ones it is given at least the first half of the path and works out the rest. A
guided answer restates the partial solution before it goes on, so it is the same text as
an unguided answer, and the states POPE's hinted rollouts learn from are states unguided
attempts reach too. The answer is the whole path, so a guess succeeds with probability
about 90^-n; it is an ordered tuple in ``\\boxed{}``, which the normal verifier scores
(order counts: two nodes swapped is wrong).

Every node is written the same way everywhere (`` 35``: one token, space first), in the
links, the path and the answer, so a lookup is a copy of a token the problem shows.

The hard split (HARD_SIZES) is chosen on the repository's base model (data/base-model):
lengths it solves none of unguided, yet close enough to its wall that hinted rollouts
practise the step its unguided attempts miss. Splits are fixed by seeds and disjoint (no
path appears in two splits). ``TASK_VERSION`` must change whenever anything here does, so
every result names the exact task it ran on. Every version's results:
docs/experiments/README.md.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from experiments.splits import distinct, train_and_held_out
from services.common.messages import Problem

TASK_VERSION = "link-chains-v11"
EASY_SIZES = (2, 3, 4, 5)
"""Chain lengths (links) whose whole path the base model is taught (easy instances)."""
HARD_SIZES = (7, 9)
"""Chain lengths of the hard split, half each. On the repository's base model (``ebae51ee...``)
neither is solved unguided (at 7 links most attempts write the first 5 links right, then the
end node); the 9-link half is where hinted rollouts practise going on, since from a hint of
2 or 3 links this base often ends early, so its hinted groups stay mixed
(docs/experiments/v14.md)."""
ALL_SIZES = tuple(range(2, 15))
"""Chain lengths the base model meets at all (the end of the path only, above EASY_SIZES)."""
LOW, HIGH = 10, 99
"""Nodes are distinct two-digit numbers (each one token of the tiny model's tokenizer)."""
SEEDS = {"train": 1001, "eval": 2002, "pretrain": 3003}


@dataclass(frozen=True)
class Instance:
    path: tuple[int, ...]
    """The nodes in order; link i goes from path[i] to path[i + 1]."""
    order: tuple[int, ...]
    """The order the links are listed in the problem (a permutation of their indices)."""

    @property
    def size(self) -> int:
        """The number of links, i.e. of lookups in the key step."""
        return len(self.path) - 1

    @property
    def key(self) -> tuple[int, ...]:
        """What makes two instances the same problem (for disjoint splits)."""
        return self.path

    @property
    def prompt(self) -> str:
        links = ", ".join(f"{self.path[i]} > {self.path[i + 1]}" for i in self.order)
        return f"Follow the links from {self.path[0]} to {self.path[-1]}: {links}"

    @property
    def key_step(self) -> str:
        return self.partial_key_step(self.size)

    def partial_key_step(self, given: int) -> str:
        """The path up to its first ``given`` links followed (0: the start node only)."""
        return "Path: " + " ".join(map(str, self.path[: given + 1]))

    @property
    def eval_links(self) -> int:
        """How many links the held-out split's hinted evaluation gives: the first half of the
        path (the whole path would leave only a copy to write)."""
        return self.size // 2

    @property
    def eval_hint(self) -> str:
        """The hint of the held-out split's hinted evaluation (``eval_links`` links)."""
        return self.partial_key_step(self.eval_links)

    @property
    def last(self) -> int:
        """Where the path ends (stated in the problem, so a model can stop by content)."""
        return self.path[-1]

    @property
    def answer(self) -> str:
        return "(" + ", ".join(map(str, self.path)) + ")"

    @property
    def solution(self) -> str:
        return f"{self.key_step}\n\nSo the answer is \\boxed{{{self.answer}}}"

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
    """An n-link chain, its links listed in random order. This draw must not change: the
    repository's base model was pretrained on material drawn by it, and is drawn again
    exactly."""
    order = list(range(n))
    rng.shuffle(order)
    return Instance(tuple(rng.sample(range(LOW, HIGH + 1), n + 1)), tuple(order))


def instances(
    split: str, count: int, sizes: tuple[int, ...] = HARD_SIZES, exclude: frozenset[tuple[int, ...]] = frozenset()
) -> list[Instance]:
    """``count`` distinct instances of ``split`` (its fixed seed), none whose key is in
    ``exclude``; sizes cycle through ``sizes``."""
    return distinct(f"{TASK_VERSION}:{SEEDS[split]}", count, make, sizes, exclude)


def hard_splits(train: int = 400, eval: int = 200) -> tuple[list[Instance], list[Instance]]:
    """The hard train and held-out eval splits, disjoint."""
    return train_and_held_out(instances, train, eval)


_PROMPT = re.compile(r"Follow the links from (\d+) to (\d+):((?:,?\s+\d+ > \d+)+)\s*$")


def parse(prompt: str) -> Instance:
    """The instance a prompt of this task states (for checkers and reports)."""
    match = _PROMPT.search(prompt)
    if match is None:
        raise ValueError(f"not a {TASK_VERSION} prompt: {prompt[:80]!r}")
    links = [(int(a), int(b)) for a, b in (pair.split(">") for pair in match.group(3).split(","))]
    after = dict(links)
    path = [int(match.group(1))]
    while path[-1] in after and len(path) <= len(links):
        path.append(after[path[-1]])
    if path[-1] != int(match.group(2)) or len(path) != len(links) + 1:
        raise ValueError(f"the links of this prompt do not make one path from start to end: {prompt[:80]!r}")
    index = {a: i for i, a in enumerate(path[:-1])}
    return Instance(tuple(path), tuple(index[a] for a, _ in links))


def solved(completion: str, inst: Instance) -> bool:
    """The exact check, without the verifier: the last boxed tuple is the path (the verifier
    also takes it without parentheses)."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    return bool(boxed) and re.sub(r"[\s()]", "", boxed[-1]) == re.sub(r"[\s()]", "", inst.answer)
