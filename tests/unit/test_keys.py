from __future__ import annotations

import pytest

from services.common.keys import Keys, prefix_glob


def test_every_name_is_under_the_prefix() -> None:
    k = Keys("run7:")
    names = [
        k.rollouts,
        k.scored,
        k.dead,
        k.problems,
        k.done("verifiers", "g1"),
        k.failures("trainers"),
        k.state("trainer"),
        k.health("verifier", "v1"),
        k.archiving("g1"),
    ]
    assert all(n.startswith("run7:") for n in names)
    assert len(set(names)) == len(names)
    assert Keys().rollouts == "pope:rollouts" and Keys().dead == "pope:dead"


@pytest.mark.parametrize("bad", ["", "a b:"])
def test_bad_prefix_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Keys(bad)


def test_prefix_glob_escapes_glob_characters() -> None:
    assert prefix_glob("run7:") == "run7:*"
    assert prefix_glob("run[1]*?\\:") == "run\\[1\\]\\*\\?\\\\:*"
