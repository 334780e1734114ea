"""The link-chains task's pretraining: the real loop runs and reports, and the repository's
base model (data/base-model) never saw a split path of this task or of its own (its whole
material stream drawn again)."""

from __future__ import annotations

import random

from experiments import chains
from experiments.chains import Instance, hard_splits, make


def test_the_loss_is_on_the_answer_and_pretraining_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A material row's prompt ids are the pipeline's chat up to the answer (no loss); the
    loss covers exactly the answer and the end token; and the real loop runs and reports."""
    import json
    import random

    from transformers import AutoTokenizer

    from experiments import pretrain as p
    from services.engine.tiny_model import IM_END, build_tiny_model
    from services.rollout.prompts import prompt_ids

    build_tiny_model(tmp_path / "m", p.SPEC, corpus=p.corpus(300))
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    end = tok.convert_tokens_to_ids(IM_END)
    example = p.examples(random.Random(1), set())
    prompt, completion = p.material_row(tok, example, end)
    assert prompt == prompt_ids(tok, example.user)
    assert tok.decode(completion[:-1]) == example.completion and completion[-1] == end
    _, _, labels = p.sft_batch([(prompt, completion)])
    assert (labels[0, : len(prompt)] == -100).all() and labels[0, len(prompt) :].tolist() == completion

    # Two steps of the real loop write a loadable model and the report (accuracy on 4 problems each).
    result = p.pretrain(tmp_path / "base", steps=2, batch=4, report_problems=4)
    assert result["steps"] == 2 and json.loads((tmp_path / "base" / "pretrain_report.json").read_text())["steps"] == 2
    kinds = {
        "easy_unhinted",
        "easy_hinted",
        "hard_unhinted",
        "hard_hinted",
        "hard_half_key_step",
        "hard_end_third_left",
    }
    assert set(result["accuracy"]) == kinds


def test_the_repository_base_never_saw_a_split_path_of_this_task_or_its_own(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """data/base-model was pretrained for task v9 (its report's ``task``, 8-link splits) with
    that task's split paths left out of its material. Its material stream drawn again (its
    report's seed and steps, batch 32 as its README says) with nothing left out holds no path
    of this task's splits nor of v9's, so leaving either out never changed a draw: the stream
    is what ``pope model pretrain`` draws today, and no held-out problem of this task was
    pretraining material. Its tokenizer is the one built from today's ``corpus()``."""
    import json

    from experiments.pretrain import SPEC, corpus, examples
    from experiments.splits import distinct, train_and_held_out
    from services.engine.tiny_model import build_tokenizer
    from tests.conftest import ROOT

    base = ROOT / "data" / "base-model"
    report = json.loads((base / "pretrain_report.json").read_text())
    rng = random.Random(report["seed"])
    drawn = set()
    for _ in range(report["steps"] * 32):
        first_line = examples(rng, set()).completion.split("\n")[0]  # "Path: a b c ..."
        drawn.add(tuple(int(x) for x in first_line.split()[1:]))
    assert len(drawn) > 50_000  # the stream was drawn (distinct paths among 86,400 examples)

    def own_instances(split: str, count: int, exclude: frozenset[tuple[int, ...]] = frozenset()) -> list[Instance]:
        """``chains.instances`` as it was for the base's own task: its version string, 8 links."""
        return distinct(f"{report['task']}:{chains.SEEDS[split]}", count, make, (8,), exclude)

    train, held_out = hard_splits()
    own_train, own_held_out = train_and_held_out(own_instances, 400, 200)
    for split in (train, held_out, own_train, own_held_out):
        assert len(split) in (200, 400) and not drawn & {i.key for i in split}

    build_tokenizer(SPEC.vocab_size, SPEC.seed, corpus=corpus()).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
