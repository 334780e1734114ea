"""A synthetic task family whose key step is the same small computation at every position:
*link chains* (tasks v6-v11 of the experiment; v1-v5 were sorted gaps, experiments/gaps.py).

    Problem:  Follow the links from 23 to 52: 41 > 17, 23 > 35, 35 > 41, 17 > 52
    Solution: Path: 23 35 41 17 52                        <- the key step: one lookup per link
              So the answer is \\boxed{(23, 35, 41, 17, 52)}  <- routine: the path as a tuple

Each step of the path is one lookup: find the link that starts at the last node written
and write where it goes. The lookup is the same at every position, so a hinted rollout,
which writes the end of a path from a given start of it, practises exactly what an
unhinted attempt needs at its start. Sorted gaps lacked this (README, "How the task got
here"): every working hint there held the sort's start, which hinted rollouts therefore
never wrote, and unhinted solving never moved through them.

Difficulty is a property of the instance: a path of n links is right only if all n
lookups are, so a model that gets a lookup right with probability p solves it with about
p^n, and a hint that gives the first h links raises that to p^(n-h). The base model
(``pope model pretrain``) works out whole paths only for short chains (EASY_SIZES); on
longer ones it is given at least the first half of the path and works out the rest. A
guided answer restates the partial solution before it goes on (v3), so it is the same
text as an unguided answer, and the end of the path that a hinted rollout works out
comes in the same place of that text as in an unguided attempt that got the start right:
the states POPE's hinted rollouts learn from are states unguided attempts reach too.
The answer is the whole path, so a guess succeeds with probability about 90^-n; it is an
ordered tuple in ``\\boxed{}``, which the normal verifier scores (order counts: two nodes
swapped is wrong).

Every node is written the same way everywhere (`` 35``: one token, space first), in the
links, the path and the answer, so a lookup is a copy of a token the problem shows. (Task
v1 of this family, ``41>17`` and a boxed digit string, wrote each node as two different tokens
and the answer as digit pieces; its base model could neither look up nor copy a path.)

Splits are fixed by seeds and disjoint (no path appears in two splits); ``TASK_VERSION``
changes whenever anything here does, so every result names the exact task it ran on.
Compared (README): v2 (easy 2-4 links, hard 7-8; guided answers began where the hint ended)
showed no transfer: unhinted attempts went wrong at the first link (99% of samples at 7
links), which every working hint gives, and its hinted rollouts wrote the path's end in a
place no unguided attempt reaches. v3: easy 2-5 links, hard 8, guided answers restate the
hint; POPE above GRPO on its base, but other pretrainings solved 8 links unguided. v4:
pretraining leaves at most the end third of a long path, hard 12: no arm solved a hard
problem unhinted (POPE's hints gave 9 of 12 links; unguided attempts erred at the first ones).
v5: v3's material and hard length on a base pretrained by steps, so it can be made again;
at learning rate 5e-5 no arm solved a hard problem unhinted; at 4e-4 POPE did in 2 seeds
of 4 (pass@8 0.88, 0.58; GRPO 0) and the other 2 collapsed in their first steps.

Task v10 (``link-chains-v7``) added *forks* (a second link from a node of the path, to a
dead end) at the first nodes of a hard path; v11 (``link-chains-v8``) made some forks
*tricky* (the dead end the smaller number) with a teacher that trusts that cue. On both,
POPE's hinted training learned its 64 training problems' branches and no held-out hard
problem was solved unhinted by any arm (README; their code: commit c5108d4). A choice at a
fork is a fact about one problem; what transferred in link-chains-v3 and -v5 was a behaviour
every problem shares: going on past where an unguided path stops.

Task v12 (``link-chains-v9``) is link-chains-v5's task and material on the base model the
repository keeps for it (data/base-model, ``ebae51ee...``, the v5 base chosen among 8 GPU
pretrainings), with the hard length moved to 7 links, where that base's unguided attempts
write the first 5 links right and then the end node (one node short). POPE's hinted
rollouts there almost never ended early, so they did not practise what the unguided
attempts lacked: held-out unhinted pass@8 above 0 in 1 seed of 4 (README).

Task v13 (``link-chains-v10``): hard = 7 and 8 links, half each, so that hinted 8-link
rollouts, unsure whether to go on, teach the unguided attempts the one node the 7-link half
lacks; POPE beat GRPO in 3 seeds of 4 (README). Task v14 (this version, ``link-chains-v11``):
7 and 9 links (HARD_SIZES says why).
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
"""Chain lengths of the hard split (task v14: half 7 links, half 9), on the repository's base
model (``ebae51ee...``), which solves none of 512 unguided samples at 7, 8 or 9 links (at 7
and 8 most write the first 5 links right, then the end node; 6 links: 0.723). The 7-link
half is one node past that wall; the 9-link half is where hinted rollouts practise going
on: given 2 or 3 of its links this base finishes 0.033 and 0.355 of them and often ends
early (60 and 43 of 512), so its hinted groups stay mixed. Task v13 had 7 and 8 (its
hinted groups were 91-98% solved after 10-30 steps and then gave little gradient: POPE beat
GRPO in 3 seeds of 4); v12 had 7 alone (hinted rollouts never ended early; 1 of
4); v5 8, v4 12, v3 8."""
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
        path (the whole path would leave only a copy to write, as the sorted-gaps split's whole
        sort left only the routine)."""
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
    """An n-link chain, its links listed in random order (link-chains-v5's draw, so the
    material of the repository's base is drawn again exactly)."""
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
