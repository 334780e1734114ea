"""A synthetic task family whose key step is the same small computation at every position:
*link chains* (tasks v6-v11 of the experiment; v1-v5 were sorted gaps, services/tasks/gaps.py).

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

Task v10 (``link-chains-v7``) added *forks*: each of the first nodes of a hard path has a
second link, to a dead end (a node no link leaves, not the end):

    Problem:  Follow the links from 23 to 52: 23 > 35, 17 > 52, 35 > 41, 23 > 88, 41 > 17
    Solution: Path: 23 35 41 17 52                   <- 23 forks: 35 goes on, 88 leads nowhere

The right branch is the one whose node a link leaves (or the end): a second lookup. v10's
base chose at forks only on short chains and, on long ones, picked at chance (0.5 right at
every fork, teacher-forced): it did not have the rule there, and POPE's hinted training
learned its training problems' branches, not the rule (README).

Task v11 (this version, ``link-chains-v8``) keeps the forks and makes the rule a skill the
base model has but does not trust. A fork is *tricky* when its dead end is the smaller of
the two numbers; the pretraining material's teacher (pretrain.FOLLOW) is always right at
other forks and, at a tricky one, follows the rule 2 times in 5 and otherwise takes the
smaller number (and ends there). So a model of the material prefers the wrong branch at
every tricky fork (greedy decoding never solves a hard instance) yet puts real probability
on the right one. A hard instance has HARD_FORKS forks at its first nodes, exactly
HARD_TRICKY of them tricky, at random places: at about 0.4 per tricky fork it is solved
about 0.4^7 of the time (the repository's base is right at 0.23 of them: README), a hint
through the first forks leaves fewer, and what hinted practice rewards, trusting the rule
over the cue, is what an unguided attempt needs at every tricky fork. No shortcut picks
every branch: half the forks of a hard instance have the larger number as their dead end.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass

from services.common.messages import Problem
from services.tasks.splits import distinct, train_and_held_out

TASK_VERSION = "link-chains-v8"
EASY_SIZES = (2, 3, 4, 5)
"""Chain lengths (links) whose whole path, forks included, the base model is taught (easy instances)."""
EASY_FORKS = 2
"""The most forks an easy instance has (at the first nodes of its path)."""
HARD_SIZES = (16,)
"""Chain length of the hard split (task v11): 14 forks, then 2 routine links."""
HARD_FORKS = 14
"""Forks of a hard instance: each of the first 14 nodes of its path (task v11)."""
HARD_TRICKY = 7
"""Tricky forks of a hard instance (task v11): forks whose dead end is the smaller number,
at random places among its forks (the rest have the larger number as their dead end)."""
ALL_SIZES = tuple(range(2, 17))
"""Chain lengths the base model meets at all."""
LOW, HIGH = 10, 99
"""Nodes are distinct two-digit numbers (each one token of the tiny model's tokenizer)."""
SEEDS = {"train": 1001, "eval": 2002, "pretrain": 3003}


@dataclass(frozen=True)
class Instance:
    path: tuple[int, ...]
    """The nodes in order; link i goes from path[i] to path[i + 1]."""
    order: tuple[int, ...]
    """The order the links are listed in the problem: a permutation of their indices, the
    path's links first, then the dead-end links (see ``links``)."""
    decoys: tuple[int, ...] = ()
    """Dead ends: path[i] also links to decoys[i] (a fork at each of the first len(decoys) nodes)."""

    @property
    def size(self) -> int:
        """The number of links on the path, i.e. of lookups in the key step."""
        return len(self.path) - 1

    @property
    def forks(self) -> int:
        return len(self.decoys)

    @property
    def tricky(self) -> tuple[int, ...]:
        """The forks whose dead end is the smaller of the two numbers (a cue that misleads there)."""
        return tuple(i for i, d in enumerate(self.decoys) if d < self.path[i + 1])

    @property
    def key(self) -> tuple[int, ...]:
        """What makes two instances the same problem (for disjoint splits)."""
        return self.path

    @property
    def links(self) -> list[tuple[int, int]]:
        """The path's links, then the dead-end ones (``order`` indexes this list)."""
        on_path = [(self.path[i], self.path[i + 1]) for i in range(self.size)]
        return on_path + [(self.path[i], d) for i, d in enumerate(self.decoys)]

    @property
    def prompt(self) -> str:
        links = self.links
        listed = ", ".join(f"{links[i][0]} > {links[i][1]}" for i in self.order)
        return f"Follow the links from {self.path[0]} to {self.path[-1]}: {listed}"

    @property
    def key_step(self) -> str:
        return self.partial_key_step(self.size)

    def partial_key_step(self, given: int) -> str:
        """The path up to its first ``given`` links followed (0: the start node only)."""
        return path_line(self.path[: given + 1])

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
        return path_tuple(self.path)

    @property
    def solution(self) -> str:
        return write_solution(self.path)

    def problem(self, split: str) -> Problem:
        return Problem.model_validate({"prompt": self.prompt, "answer": self.answer, "solution": self.solution,
                                       "split": split, "source": TASK_VERSION})  # fmt: skip


def path_line(path: tuple[int, ...] | list[int]) -> str:
    """The key step's text for ``path`` (``Path: 23 35 41``)."""
    return "Path: " + " ".join(map(str, path))


def path_tuple(path: tuple[int, ...] | list[int]) -> str:
    """``path`` as the boxed answer's ordered tuple (``(23, 35, 41)``)."""
    return "(" + ", ".join(map(str, path)) + ")"


def write_solution(path: tuple[int, ...] | list[int]) -> str:
    """The solution text that ends at ``path``'s last node (the reference solution for the
    instance's own path; a wrong one for a path that stops at a dead end)."""
    return f"{path_line(path)}\n\nSo the answer is \\boxed{{{path_tuple(path)}}}"


def make(rng: random.Random, n: int, forks: int = 0) -> Instance:
    """An n-link chain with a fork at each of its first ``forks`` nodes, links in random order."""
    nodes = rng.sample(range(LOW, HIGH + 1), n + 1 + forks)
    order = list(range(n + forks))
    rng.shuffle(order)
    return Instance(tuple(nodes[: n + 1]), tuple(order), tuple(nodes[n + 1 :]))


def make_easy(rng: random.Random, n: int) -> Instance:
    """A short chain with 0 to EASY_FORKS forks (the material's and the easy problems' kind)."""
    return make(rng, n, rng.randint(0, min(EASY_FORKS, n)))


def make_hard(rng: random.Random, n: int) -> Instance:
    """A hard instance: HARD_FORKS forks, exactly HARD_TRICKY of them tricky (drawn again until so)."""
    while True:
        inst = make(rng, n, HARD_FORKS)
        if len(inst.tricky) == HARD_TRICKY:
            return inst


def instances(split: str, count: int, sizes: tuple[int, ...] = HARD_SIZES,
              exclude: frozenset[tuple[int, ...]] = frozenset(), easy: bool = False) -> list[Instance]:  # fmt: skip
    """``count`` distinct instances of ``split`` (its fixed seed), none whose key is in
    ``exclude``; sizes cycle through ``sizes``; hard (HARD_FORKS forks) unless ``easy``."""
    return distinct(f"{TASK_VERSION}:{SEEDS[split]}", count, make_easy if easy else make_hard, sizes, exclude)


def hard_splits(train: int = 400, eval: int = 200) -> tuple[list[Instance], list[Instance]]:
    """The hard train and held-out eval splits, disjoint."""
    return train_and_held_out(instances, train, eval)


_PROMPT = re.compile(r"Follow the links from (\d+) to (\d+):((?:,?\s+\d+ > \d+)+)\s*$")


def parse(prompt: str) -> Instance:
    """The instance a prompt of this task states (for checkers and reports). At a fork the
    path takes the branch a link leaves (or the end); the other must be a dead end."""
    match = _PROMPT.search(prompt)
    if match is None:
        raise ValueError(f"not a {TASK_VERSION} prompt: {prompt[:80]!r}")
    start, end = int(match.group(1)), int(match.group(2))
    links = [(int(a), int(b)) for a, b in (pair.split(">") for pair in match.group(3).split(","))]
    after: dict[int, list[int]] = defaultdict(list)
    for a, b in links:
        after[a].append(b)
    path, decoys = [start], list[int]()
    while path[-1] != end and len(path) <= len(links):
        ahead = after.get(path[-1], [])
        going = [b for b in ahead if b == end or b in after]
        if len(going) != 1 or len(ahead) > 2 or (len(ahead) == 2 and len(decoys) != len(path) - 1):
            break  # no way on, two, or a fork after an unforked node: not one of this task's paths
        if len(ahead) == 2:
            decoys.append(next(b for b in ahead if b != going[0]))
        path.append(going[0])
    if path[-1] != end or len(path) - 1 + len(decoys) != len(links):
        raise ValueError(f"the links of this prompt do not make one path from start to end: {prompt[:80]!r}")
    inst = Instance(tuple(path), (), tuple(decoys))
    index = {link: i for i, link in enumerate(inst.links)}
    return Instance(inst.path, tuple(index[link] for link in links), inst.decoys)


def solved(completion: str, inst: Instance) -> bool:
    """The exact check, without the verifier: the last boxed tuple is the path (the verifier
    also takes it without parentheses)."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    return bool(boxed) and re.sub(r"[\s()]", "", boxed[-1]) == re.sub(r"[\s()]", "", inst.answer)
