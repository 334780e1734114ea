"""The link-chains task (v11: forked chains with tricky forks): fixed, disjoint splits;
reference solutions the verifier accepts; a checker under which near misses and guesses
fail; and the base model's pretraining material, whose teacher trusts a misleading cue at
tricky forks."""

from __future__ import annotations

import random

import pytest

from services.tasks import chains
from services.tasks.chains import Instance, hard_splits, make, parse, solved
from services.verifier.scoring import parse_gold, score_answer


def test_an_instance_and_its_reference_solution() -> None:
    inst = Instance(path=(23, 35, 41, 17, 52), order=(2, 0, 1, 3))
    assert inst.prompt == "Follow the links from 23 to 52: 41 > 17, 23 > 35, 35 > 41, 17 > 52"
    assert inst.size == 4 and inst.last == 52
    assert inst.key_step == "Path: 23 35 41 17 52"
    assert inst.partial_key_step(0) == "Path: 23" and inst.partial_key_step(2) == "Path: 23 35 41"
    assert inst.eval_hint == "Path: 23 35 41"
    assert inst.answer == "(23, 35, 41, 17, 52)"
    assert inst.solution == "Path: 23 35 41 17 52\n\nSo the answer is \\boxed{(23, 35, 41, 17, 52)}"
    problem = inst.problem("train")
    assert problem.source == chains.TASK_VERSION and problem.solution == inst.solution
    assert problem.answer == "(23, 35, 41, 17, 52)"
    assert parse(inst.prompt) == inst


def test_a_forked_instance_states_its_dead_ends_and_parses_back() -> None:
    inst = Instance(path=(23, 35, 41, 17, 52), order=(0, 3, 1, 5, 2, 4), decoys=(88, 60))
    assert inst.forks == 2 and inst.links[4:] == [(23, 88), (35, 60)]
    assert inst.prompt == "Follow the links from 23 to 52: 23 > 35, 17 > 52, 35 > 41, 35 > 60, 41 > 17, 23 > 88"
    assert inst.solution == "Path: 23 35 41 17 52\n\nSo the answer is \\boxed{(23, 35, 41, 17, 52)}"
    assert parse(inst.prompt) == inst
    # Taking a dead end is wrong, for the checker and the verifier alike.
    gold = parse_gold(inst.answer)
    assert not solved("\\boxed{(23, 88, 52)}", inst)
    assert score_answer(gold, "So the answer is \\boxed{(23, 88, 52)}").reward == 0.0


def test_a_prompt_that_is_not_one_path_is_refused() -> None:
    with pytest.raises(ValueError, match="not a link-chains"):
        parse("Sort these numbers: 1 2 3")
    with pytest.raises(ValueError, match="one path"):
        parse("Follow the links from 23 to 52: 41 > 17, 23 > 35, 17 > 52")  # 35 leads nowhere
    with pytest.raises(ValueError, match="one path"):
        parse("Follow the links from 23 to 52: 23 > 35, 35 > 41, 41 > 17, 17 > 52, 60 > 61")  # a link off the path
    with pytest.raises(ValueError, match="one path"):
        parse("Follow the links from 23 to 52: 23 > 35, 35 > 41, 35 > 60, 41 > 52")  # a fork after an unforked node
    with pytest.raises(ValueError, match="one path"):
        parse("Follow the links from 23 to 52: 23 > 35, 23 > 41, 35 > 52, 41 > 52")  # two ways on


def test_splits_are_fixed_disjoint_and_hard() -> None:
    train, held_out = hard_splits()
    again_train, again_eval = hard_splits()
    assert train == again_train and held_out == again_eval  # fixed by seed
    assert len(train) == 400 and len(held_out) == 200
    assert not {i.key for i in train} & {i.key for i in held_out}
    assert {i.size for i in train + held_out} == set(chains.HARD_SIZES)
    assert not set(chains.HARD_SIZES) & set(chains.EASY_SIZES) and set(chains.HARD_SIZES) <= set(chains.ALL_SIZES)
    assert {i.forks for i in train + held_out} == {chains.HARD_FORKS} and chains.HARD_FORKS > chains.EASY_FORKS
    # Exactly HARD_TRICKY forks of each hard instance have the smaller number as their dead
    # end, at places that vary: no rule of position or size picks every branch right.
    assert {len(i.tricky) for i in train + held_out} == {chains.HARD_TRICKY}
    assert len({i.tricky for i in train}) > 100 and {f for i in train for f in i.tricky} == set(
        range(chains.HARD_FORKS)
    )
    nodes = [(*i.path, *i.decoys) for i in train]
    assert all(len(set(n)) == len(n) and all(10 <= x <= 99 for x in n) for n in nodes)
    assert all(parse(i.prompt) == i for i in train)


@pytest.mark.parametrize("seed", range(5))
def test_the_verifier_accepts_the_reference_and_refuses_near_misses(seed: int) -> None:
    inst = make(random.Random(seed), 8)
    gold = parse_gold(inst.answer)
    assert score_answer(gold, inst.solution).reward == 1.0 and solved(inst.solution, inst)
    bare = f"So the answer is \\boxed{{{inst.answer[1:-1]}}}"  # without parentheses: still the tuple, in order
    assert score_answer(gold, bare).reward == 1.0 and solved(bare, inst)
    # One node wrong, two nodes swapped, or the path stopped one link early: wrong, for both.
    path = list(inst.path)
    off = [*path[:3], next(x for x in range(10, 100) if x not in path), *path[4:]]
    swapped = [path[0], path[2], path[1], *path[3:]]
    for wrong in (off, swapped, path[:-1]):
        text = "(" + ", ".join(map(str, wrong)) + ")"
        assert score_answer(gold, f"So the answer is \\boxed{{{text}}}").reward == 0.0
        assert not solved(f"\\boxed{{{text}}}", inst)
    assert not solved("no boxed answer", inst)


def test_hints_up_to_half_the_path_fit_in_the_experiments_hint_budget() -> None:
    """The experiment's hint search tries prefixes up to 35% of the solution's tokens: that
    reaches past the middle of every hard path, so a hint can leave the model half the path
    or less to write; and every cut of the path is a prefix of the solution. (Checked in
    characters: a node is one token and three characters on the path, but the answer's
    digits are two characters a token, so the path is a larger share of the tokens.)"""
    from services.tasks.experiment import Spec

    for inst in hard_splits()[0][:50]:
        assert len(inst.eval_hint) < Spec().hint_settings().max_fraction * len(inst.solution)
        assert inst.partial_key_step(inst.size) == inst.key_step
        assert all(inst.solution.startswith(inst.partial_key_step(g) + " ") for g in range(inst.size))


def test_an_instances_tricky_forks_are_those_whose_dead_end_is_the_smaller_number() -> None:
    inst = Instance(path=(23, 35, 41, 17, 52), order=(0, 3, 1, 5, 2, 4, 6), decoys=(88, 30, 12))
    assert inst.tricky == (1, 2)  # 30 < 41 and 12 < 17; 88 > 35
    assert chains.write_solution((23, 35, 30)) == "Path: 23 35 30\n\nSo the answer is \\boxed{(23, 35, 30)}"


def test_pretraining_material_forks_everywhere_and_its_teacher_trusts_the_smaller_number() -> None:
    """Chains of every length with forks at their first 0..n nodes, unguided and guided from
    any given part (restated); the hard splits' paths never appear. The teacher's answer is
    the whole solution except at a tricky fork past the given part, where it takes the dead
    end (and stops) 3 times in 5; at any other fork it is right."""
    from services.common.messages import Variant
    from services.rollout.prompts import user_message
    from services.tasks.pretrain import FOLLOW, TEMPLATE, examples, hinted_problem

    train, held_out = hard_splits()
    exclude = {i.key for i in train + held_out}
    rng = random.Random(0)
    seen = {"unguided_long_forked": 0, "partial_long_forked": 0, "routine": 0}
    tricky_met = tricky_followed = 0
    sizes = set()
    for _ in range(3000):
        user, completion = examples(rng, exclude)
        inst = parse(user.split("\n\n")[0])
        n = inst.size
        sizes.add(n)
        assert inst.key not in exclude
        if user == user_message(inst.problem("train"), Variant.UNHINTED, TEMPLATE):
            given = 0
            seen["unguided_long_forked"] += n not in chains.EASY_SIZES and inst.forks > chains.EASY_FORKS
        else:
            given = next(g for g in range(n + 1) if user.endswith("\n" + inst.partial_key_step(g)))
            assert user == user_message(hinted_problem(inst, given), Variant.HINTED, TEMPLATE)
            seen["routine"] += given == n
            seen["partial_long_forked"] += given < n and n not in chains.EASY_SIZES and inst.forks > given + 2
        written = completion.split("\n")[0].split()[1:]
        # The given part is restated; past it the path is right up to where it ends, and it
        # ends early only at the dead end of a tricky fork.
        assert written[: given + 1] == [str(x) for x in inst.path[: given + 1]]
        stop = len(written) - 1
        assert written[:stop] == [str(x) for x in inst.path[:stop]]
        wrong = completion != inst.solution
        if wrong:  # the dead end of fork stop - 1, a tricky one past the given part
            assert stop - 1 in inst.tricky and written[stop] == str(inst.decoys[stop - 1]) and stop - 1 >= given
        met = [f for f in inst.tricky if given <= f < stop]
        tricky_met += len(met)
        tricky_followed += len(met) - wrong
    assert min(seen.values()) > 100, seen
    assert sizes == set(chains.ALL_SIZES)
    assert abs(tricky_followed / tricky_met - FOLLOW) < 0.03, (tricky_followed, tricky_met)
