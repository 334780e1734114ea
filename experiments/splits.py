"""Fixed, disjoint splits of a synthetic task family (chains.py).

    held_out = distinct("link-chains-v2:2002", 200, make, sizes=(7, 8))

An instance is drawn by ``make(rng, size)`` and is the same problem as another when their
``key`` is equal; the random stream is seeded by a name that holds the task version and the
split's seed, so a split is a pure function of the task version.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from typing import Protocol, TypeVar


class Keyed(Protocol):
    @property
    def key(self) -> Hashable: ...


T = TypeVar("T", bound=Keyed)


def distinct(
    seed_name: str,
    count: int,
    make: Callable[[random.Random, int], T],
    sizes: tuple[int, ...],
    exclude: frozenset[Hashable] = frozenset(),
) -> list[T]:
    """``count`` distinct instances drawn from the stream ``seed_name``, none whose key is in
    ``exclude``; sizes cycle through ``sizes``."""
    rng = random.Random(seed_name)
    out: list[T] = []
    seen = set(exclude)
    while len(out) < count:
        inst = make(rng, sizes[len(out) % len(sizes)])
        if inst.key not in seen:
            seen.add(inst.key)
            out.append(inst)
    return out


def train_and_held_out(instances: Callable[..., list[T]], train: int, eval: int) -> tuple[list[T], list[T]]:
    """A task's hard train and held-out eval splits, disjoint: ``instances(split, count,
    exclude=...)`` draws a split; the train split leaves out every held-out key."""
    held_out = instances("eval", eval)
    return instances("train", train, exclude=frozenset(i.key for i in held_out)), held_out
