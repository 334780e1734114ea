"""Pure parts of `pope experiment`: the report's sample pick, the metrics reader, run configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.demo import examples
from experiments.experiment import arm_problems, read_metrics, run_config, task_problems, within_reach
from experiments.spec import ARMS, Spec, trainer_extra
from services.common.messages import HintSearch, Problem, ProblemLabel


def _row(step: int, variant: str, reward: float, problem: str, text: str) -> dict[str, object]:
    return {
        "step": step,
        "variant": variant,
        "reward": reward,
        "problem_id": problem,
        "prompt": f"P {problem}",
        "text": text,
        "group_id": "g",
    }


def test_examples_pair_the_last_solved_hinted_sample_with_an_unhinted_one_of_its_problem(tmp_path: Path) -> None:
    archive = tmp_path / "rollouts.jsonl"
    rows = [
        _row(1, "hinted", 1.0, "a", "early win"),
        _row(2, "unhinted", 0.0, "b", "b plain"),
        _row(3, "hinted", 1.0, "b", "late win"),
        _row(3, "hinted", 0.0, "c", "loss"),
        _row(4, "unhinted", 0.0, "b", "b plain later"),
    ]
    archive.write_text("".join(json.dumps(r) + "\n" for r in rows))
    picked = examples(archive)
    assert [(e["variant"], e["text"]) for e in picked] == [("hinted", "late win"), ("unhinted", "b plain later")]
    assert set(picked[0]) == {"variant", "step", "reward", "prompt", "text"}
    assert examples(tmp_path / "missing.jsonl") == []


def test_metrics_keep_the_last_line_of_a_step_and_turn_nan_into_null(tmp_path: Path) -> None:
    lines = ['{"step": 1, "loss": 1.0}', '{"step": 2, "reward_hinted": NaN}', '{"step": 1, "loss": 0.5}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "reward_hinted": None}]


def test_arms_differ_only_in_problems_and_hinted_share(tmp_path: Path) -> None:
    spec = Spec()
    configs = {arm: run_config(spec, arm, 3, tmp_path / arm) for arm in ARMS}
    for arm, c in configs.items():
        assert c["rollout"]["hinted_fraction"] == ARMS[arm].hinted_fraction
        assert c["shared"]["seed"] == 3 and c["shared"]["group_size"] == spec.group_size
        assert c["shared"]["prompts_per_step"] == spec.prompts_per_step
        assert c["trainer"]["learning_rate"] == spec.learning_rate
    assert len({c["shared"]["key_prefix"] for c in configs.values()}) == len(ARMS)  # no shared Redis state
    assert ARMS["pope"].hinted_fraction == 0.5 and ARMS["grpo"].hinted_fraction == 0.0


def test_arm_problems_strip_hints_and_verdicts_for_grpo_and_keep_them_for_pope() -> None:
    hard, _, easy = task_problems(Spec(train_problems=3, eval_problems=10))
    hinted = hard[0].model_copy(
        update={
            "hint": "Largest: 50",
            "label": ProblemLabel.HARD_HINTED,
            "search": HintSearch.model_validate(
                {
                    "label": "hard_hinted",
                    "unhinted_attempts": 8,
                    "unhinted_successes": 0,
                    "prefix_chars": 11,
                    "prefix_fraction": 0.1,
                    "prefix_tokens": 3,
                    "hinted_attempts": 8,
                    "hinted_successes": 1,
                    "tokens_spent": 10,
                    "config": "x",
                    "model_path": "m",
                    "method": "linear",
                    "template_version": "chains-v1",
                }
            ),
        }
    )
    searched = [hinted, *hard[1:]]
    arms = arm_problems(searched, easy)
    assert arms["pope"] == searched and arms["hinted_only"] == [hinted]
    for p in arms["grpo"] + arms["grpo_easy"]:  # every row valid as the API will read it
        Problem.model_validate_json(p.model_dump_json())
    assert all(p.hint is None and p.search is None for p in arms["grpo"])
    assert [p.id for p in arms["grpo"]] == [p.id for p in searched]
    assert arms["grpo_easy"][3:] == easy and all(p.label == ProblemLabel.EASY for p in easy)


def test_a_base_that_solves_hard_problems_unhinted_is_warned_about() -> None:
    """The comparison tests POPE only where the base never solves the hard split unhinted."""

    def base(unhinted: float) -> dict[str, object]:
        return {
            "k": 8,
            "summary": {
                "unhinted": {"pass@1": unhinted / 4, "pass@8": unhinted},
                "hinted": {"pass@1": 0.9, "pass@8": 1.0},
            },
        }

    assert within_reach(base(0.0)) is None
    warning = within_reach(base(0.115))
    assert warning is not None and "pass@8 0.115" in warning and "GRPO will get reward too" in warning


def test_trainer_options_are_checked_against_the_trainers_settings_and_reach_every_run(tmp_path: Path) -> None:
    extra = trainer_extra(["kl_coef=0.05", "lr_schedule=cosine", "tis_cap="], {"grad_clip": 1.0, "kl_coef": 0.1})
    assert extra == {"grad_clip": 1.0, "kl_coef": 0.05, "lr_schedule": "cosine", "tis_cap": None}
    config = run_config(Spec(extra=extra), "grpo", 0, tmp_path)
    assert config["trainer"]["kl_coef"] == 0.05 and config["trainer"]["grad_clip"] == 1.0
    for bad, says in [
        ("kl_coef", "KEY=VALUE"),
        ("kl_coef=-1", "greater than or equal to 0"),
        ("kl_coeff=0.1", "not a trainer setting"),
        ("checkpoint_dir=/tmp", "not a trainer setting"),
        ("learning_rate=1e-4", "--lr"),
        ("lr_schedule=linear", "'constant'"),
    ]:
        with pytest.raises(SystemExit, match=says):
            trainer_extra([bad], {})
