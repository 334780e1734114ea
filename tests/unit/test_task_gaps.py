"""The sorted-gaps task (v1-v5, kept for the README's earlier tables): fixed, disjoint
splits; reference solutions the verifier accepts; a checker under which near misses and
guesses fail."""

from __future__ import annotations

import random

import pytest

from services.tasks.gaps import HARD_SIZES, TASK_VERSION, Instance, hard_splits, make, parse_numbers, solved
from services.verifier.scoring import parse_gold, score_answer


def test_an_instance_and_its_reference_solution() -> None:
    inst = Instance((47, 12, 88, 35))
    assert inst.prompt == "Sort these numbers, then give the gaps between neighbours: 47 12 88 35"
    assert inst.key_step == "Largest: 88\nSorted: 12 35 47 88"
    assert inst.routine == "Gaps: 35-12=23 47-35=12 88-47=41"
    assert inst.answer == "231241"
    assert (
        inst.solution
        == "Largest: 88\nSorted: 12 35 47 88\n\nGaps: 35-12=23 47-35=12 88-47=41\n\nSo the answer is \\boxed{231241}"
    )
    assert Instance((15, 12, 40)).routine == "Gaps: 15-12=03 40-15=25"  # padded: the answer copies them
    assert Instance((15, 12, 40)).answer == "325"
    problem = inst.problem("train")
    assert problem.source == TASK_VERSION and problem.solution == inst.solution and problem.answer == "231241"
    assert parse_numbers(inst.prompt) == inst


def test_splits_are_fixed_disjoint_and_hard() -> None:
    train, held_out = hard_splits()
    again_train, again_eval = hard_splits()
    assert train == again_train and held_out == again_eval  # fixed by seed
    assert len(train) == 400 and len(held_out) == 200
    assert not {i.sorted for i in train} & {i.sorted for i in held_out}
    assert {len(i.numbers) for i in train + held_out} == set(HARD_SIZES)
    assert all(len(set(i.numbers)) == len(i.numbers) and all(10 <= x <= 59 for x in i.numbers) for i in train)


@pytest.mark.parametrize("seed", range(5))
def test_the_verifier_accepts_the_reference_and_refuses_near_misses(seed: int) -> None:
    inst = make(random.Random(seed), 8)
    gold = parse_gold(inst.answer)
    assert score_answer(gold, inst.solution).reward == 1.0 and solved(inst.solution, inst)
    # One gap off by one, or two gaps swapped: wrong, for the verifier and the checker.
    gaps = list(inst.gaps)
    gaps[3] += 1
    off = str(int("".join(f"{g:02d}" for g in gaps)))
    swapped = list(inst.gaps)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    for wrong in (off, str(int("".join(f"{g:02d}" for g in swapped)))):
        if wrong != inst.answer:
            assert score_answer(gold, f"So the answer is \\boxed{{{wrong}}}").reward == 0.0
            assert not solved(f"\\boxed{{{wrong}}}", inst)
    assert not solved("no boxed answer", inst)


def test_the_key_step_fits_in_the_experiments_hint_budget() -> None:
    """The experiment's hint search tries prefixes up to 35% of the solution (the paper's 25%
    is of long math solutions; here the routine is short): the whole sort must fit."""
    from services.tasks.experiment import Spec

    for inst in hard_splits()[0][:50]:
        assert len(inst.key_step) < Spec().hint_settings().max_fraction * len(inst.solution)
        assert inst.partial_key_step(len(inst.numbers)) == inst.key_step
        assert inst.solution.startswith(inst.partial_key_step(3) + " ")
