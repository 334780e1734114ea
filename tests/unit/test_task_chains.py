"""The link-chains task (v14, ``link-chains-v11``): fixed, disjoint splits; reference solutions
the verifier accepts; a checker under which near misses and guesses fail; and the base
model's pretraining material (chains-sft-v3), which teaches whole paths only on short chains."""

from __future__ import annotations

import random

import pytest

from experiments import chains
from experiments.chains import Instance, hard_splits, make, parse, solved
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


def test_a_prompt_that_is_not_one_path_is_refused() -> None:
    with pytest.raises(ValueError, match="not a link-chains"):
        parse("Sort these numbers: 1 2 3")
    with pytest.raises(ValueError, match="one path"):
        parse("Follow the links from 23 to 52: 41 > 17, 23 > 35, 17 > 52")  # 35 leads nowhere
    with pytest.raises(ValueError, match="one path"):
        parse("Follow the links from 23 to 52: 23 > 35, 35 > 41, 41 > 17, 17 > 52, 60 > 61")  # a link off the path


def test_splits_are_fixed_disjoint_and_hard() -> None:
    train, held_out = hard_splits()
    again_train, again_eval = hard_splits()
    assert train == again_train and held_out == again_eval  # fixed by seed
    assert len(train) == 400 and len(held_out) == 200
    assert not {i.key for i in train} & {i.key for i in held_out}
    assert {i.size for i in train + held_out} == set(chains.HARD_SIZES)
    assert not set(chains.HARD_SIZES) & set(chains.EASY_SIZES) and set(chains.HARD_SIZES) <= set(chains.ALL_SIZES)
    assert all(len(set(i.path)) == len(i.path) and all(10 <= x <= 99 for x in i.path) for i in train)
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
    from experiments.spec import Spec

    for inst in hard_splits()[0][:50]:
        assert len(inst.eval_hint) < Spec().hint_settings().max_fraction * len(inst.solution)
        assert inst.partial_key_step(inst.size) == inst.key_step
        assert all(inst.solution.startswith(inst.partial_key_step(g) + " ") for g in range(inst.size))


def test_pretraining_material_is_easy_only_and_in_the_pipelines_prompt_format() -> None:
    """Whole paths are worked out only on short chains; on longer ones the model is given all
    but the end half of the path and works out at most that end half. Every answer is the
    whole solution: a guided one restates its partial solution first."""
    from experiments.pretrain import TEMPLATE, examples, hinted_problem, links_left
    from services.common.messages import Variant
    from services.rollout.prompts import user_message

    train, held_out = hard_splits()
    exclude = {i.key for i in train + held_out}
    rng = random.Random(0)
    seen = {"full": 0, "partial": 0, "finish": 0, "routine": 0}
    sizes = set()
    for _ in range(1500):
        user, completion = examples(rng, exclude)
        inst = parse(user.split("\n\n")[0])
        n = inst.size
        sizes.add(n)
        assert inst.key not in exclude
        assert completion == inst.solution  # guided or not, the answer is the whole solution
        if user == user_message(inst.problem("train"), Variant.UNHINTED, TEMPLATE):  # unguided: short chains only
            assert n in chains.EASY_SIZES
            seen["full"] += 1
            continue
        given = next(g for g in range(n + 1) if user.endswith("\n" + inst.partial_key_step(g)))
        assert user == user_message(hinted_problem(inst, given), Variant.HINTED, TEMPLATE)
        if given == n:  # the routine after the whole path, at any length
            seen["routine"] += 1
        elif n in chains.EASY_SIZES and n - given not in links_left(n):  # any part of a short chain's path
            seen["partial"] += 1
        else:  # a long chain: only its end half is left to work out
            assert n - given in links_left(n), (n, given)
            seen["finish"] += n not in chains.EASY_SIZES
    assert min(seen.values()) > 50, seen
    assert sizes == set(chains.ALL_SIZES)


def test_the_experiment_config_uses_the_template_the_base_model_learned() -> None:
    from experiments.pretrain import TEMPLATE
    from services.common.config import load_settings
    from services.rollout.settings import RolloutSettings
    from tests.conftest import ROOT

    assert load_settings(RolloutSettings, ROOT / "configs" / "chains.yaml").prompt_template == TEMPLATE


def test_micro_batches_give_one_padded_batchs_loss_and_gradient(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """sft_backward (rows sorted by length in parts, each padded to its own longest, no
    attention mask, the LM head only where there is a label) gives the loss and gradient of
    the whole batch right-padded with its attention mask through HF's own loss."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments import pretrain as p
    from services.engine.tiny_model import IM_END, build_tiny_model

    torch.manual_seed(0)
    build_tiny_model(tmp_path / "m", p.SPEC, corpus=p.corpus(300), init_std=0.02)
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    end = tok.convert_tokens_to_ids(IM_END)
    rng = random.Random(3)
    rows = [p.material_row(tok, p.examples(rng, set()), end) for _ in range(12)]
    assert len({len(a) + len(b) for a, b in rows}) > 4  # lengths differ, so the parts pad differently

    def gradient() -> torch.Tensor:
        g = torch.cat([q.grad.flatten() for q in model.parameters()])
        model.zero_grad()
        return g

    ids, attn, labels = p.sft_batch(rows)
    reference = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    reference.backward()
    expected = gradient()
    for parts in (1, 3, 5, 12, 40):
        loss = p.sft_backward(model, rows, parts)
        got = gradient()
        assert abs(loss - float(reference.detach())) < 1e-5, parts
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (parts, float((got - expected).abs().max()))
    assert float(expected.norm()) > 0.1
