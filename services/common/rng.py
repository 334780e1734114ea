"""Python RNG state <-> JSON, so checkpoints and Redis state stay pickle-free.

``random.getstate()`` is (version, tuple of 625 ints, gauss_next); JSON has no tuples,
so it travels as nested lists and is turned back into tuples on the way in. Works with
a ``random.Random`` instance or the ``random`` module itself.
"""

from __future__ import annotations

from typing import Any


def rng_state_json(rng: Any) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def restore_rng_state(rng: Any, state: list[Any]) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))
