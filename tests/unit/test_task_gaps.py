"""The sorted-gaps task: fixed, disjoint splits; reference solutions the verifier accepts;
a checker under which near misses and guesses fail."""

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


def test_pretraining_material_is_easy_only_and_in_the_pipelines_prompt_format() -> None:
    """The sort is learned whole only on short lists; on longer ones the model writes at most
    its last one or two numbers (the last being the largest, stated on the first line)."""
    import random

    from services.common.messages import Variant
    from services.rollout.prompts import user_message
    from services.tasks.gaps import EASY_SIZES
    from services.tasks.pretrain import FINISH_LEFT, TEMPLATE, examples, hinted_problem

    train, held_out = hard_splits()
    exclude = {i.sorted for i in train + held_out}
    rng = random.Random(0)
    seen = {"full": 0, "partial": 0, "finish": 0, "routine": 0, "tail": 0}
    for _ in range(1500):
        user, given, completion = examples(rng, exclude)
        inst = parse_numbers(user.split("\n\n")[0])
        n = len(inst.numbers)
        assert inst.sorted not in exclude
        assert given + completion == inst.solution or user.endswith(inst.solution[: -len(completion)])
        if given:  # an unhinted answer started for the model (no loss), at any length: it writes the end
            assert user == user_message(inst.problem("train"), Variant.UNHINTED, TEMPLATE)
            left = next(k for k in FINISH_LEFT if given == inst.partial_key_step(n - k))
            assert completion.split()[left - 1] == str(max(inst.numbers))
            seen["tail"] += n not in EASY_SIZES
        elif completion == inst.solution:  # the whole solution, key step included: short lists only
            assert n in EASY_SIZES
            assert user == user_message(inst.problem("train"), Variant.UNHINTED, TEMPLATE)
            seen["full"] += 1
        elif completion.startswith("\n\nGaps: "):  # the routine after a whole given sort, at any length
            assert user == user_message(hinted_problem(inst), Variant.HINTED, TEMPLATE)
            assert user.endswith(inst.key_step) and inst.key_step + completion == inst.solution
            seen["routine"] += 1
        else:  # continued from part of its sort: any part of a short list's, the last 1-2 numbers of any
            hint = next(g for g in range(n) if user.endswith("\n" + inst.partial_key_step(g)))
            assert user == user_message(hinted_problem(inst, hint), Variant.HINTED, TEMPLATE)
            assert inst.partial_key_step(hint) + completion == inst.solution
            if n in EASY_SIZES and hint < n - max(FINISH_LEFT):
                seen["partial"] += 1
            else:  # a long list: only its end is written
                assert n - hint in FINISH_LEFT, (n, hint)
                seen["finish"] += n not in EASY_SIZES
                assert completion.split()[n - hint - 1] == str(max(inst.numbers))
    assert min(seen.values()) > 50, seen


def test_the_experiment_config_uses_the_template_the_base_model_learned() -> None:
    from services.common.config import load_settings
    from services.rollout.settings import RolloutSettings
    from services.tasks.pretrain import TEMPLATE
    from tests.conftest import ROOT

    assert load_settings(RolloutSettings, ROOT / "configs" / "gaps.yaml").prompt_template == TEMPLATE


def test_a_started_answer_is_context_and_the_rest_is_learned(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A "tail" example's given start of the answer sits in the prompt ids (no loss); the
    loss covers exactly the rest of the solution and the end token; and pretraining runs."""
    import json
    import random

    from transformers import AutoTokenizer

    from services.engine.tiny_model import IM_END, build_tiny_model
    from services.rollout.prompts import prompt_ids
    from services.tasks import pretrain as p

    build_tiny_model(tmp_path / "m", p.SPEC, corpus=p.corpus(300))
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    end = tok.convert_tokens_to_ids(IM_END)
    rng = random.Random(1)
    tail = next(e for e in iter(lambda: p.examples(rng, set()), None) if e.given)
    prompt, completion = p.material_row(tok, tail, end)
    assert prompt[: len(prompt_ids(tok, tail.user))] == prompt_ids(tok, tail.user)
    assert tok.decode(prompt[len(prompt_ids(tok, tail.user)) :]) == tail.given
    assert tok.decode(completion[:-1]) == tail.completion and completion[-1] == end
    _, _, labels = p.sft_batch([(prompt, completion)])
    assert (labels[0, : len(prompt)] == -100).all() and labels[0, len(prompt) :].tolist() == completion

    # Two steps of the real loop write a loadable model and the report (accuracy on 4 problems each).
    result = p.pretrain(tmp_path / "base", max_steps=2, batch=4, report_problems=4)
    assert result["steps"] == 2 and json.loads((tmp_path / "base" / "pretrain_report.json").read_text())["steps"] == 2
    assert set(result["accuracy"]) == {"easy_unhinted", "easy_hinted", "hard_unhinted", "hard_hinted", "hard_half_sort"}
