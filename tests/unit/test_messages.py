"""Message invariants: a message that exists is a valid one."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from services.common.messages import (
    DeadLetter,
    MessageError,
    Problem,
    ProblemLabel,
    RawGroup,
    RunShape,
    Sample,
    Score,
    ScoredGroup,
    TrainerControl,
    Variant,
    decode,
    encode,
)
from tests.factories import group, sample


def test_problem_id_is_derived_from_content_and_stable() -> None:
    a = Problem(prompt="What is 2+2?", answer="4")
    b = Problem.model_validate({"prompt": "What is 2+2?", "answer": "4", "source": "other"})
    c = Problem(prompt="What is 2+3?", answer="5")
    assert a.id == b.id and a.id.startswith("p-")
    assert a.id != c.id
    assert Problem(id="mine", prompt="x", answer="1").id == "mine"


def test_problem_rejects_empty_fields_and_hinted_label_without_hint() -> None:
    with pytest.raises(ValidationError, match="prompt"):
        Problem(prompt="", answer="4")
    with pytest.raises(ValidationError, match="requires a hint"):
        Problem(prompt="p", answer="4", label=ProblemLabel.HARD_HINTED)
    ok = Problem(prompt="p", answer="4", label="hard_hinted", hint="First, note that")
    assert ok.label is ProblemLabel.HARD_HINTED
    with pytest.raises(ValidationError, match="split"):
        Problem(prompt="p", answer="4", split="test")


def test_sample_logprobs_one_per_completion_token() -> None:
    with pytest.raises(ValidationError, match="logprobs has 2 entries but completion_ids has 3"):
        Sample(
            problem_id="p",
            variant="hinted",
            prompt_ids=[1],
            completion_ids=[1, 2, 3],
            logprobs=[-1.0, -1.0],
            finish_reason="stop",
            weight_version=0,
            text="",
        )


@pytest.mark.parametrize("bad", [0.5, float("nan"), float("-inf")])
def test_sample_rejects_values_that_are_not_logprobs(bad: float) -> None:
    with pytest.raises(ValidationError, match="not a log-probability"):
        Sample(
            problem_id="p",
            variant="hinted",
            prompt_ids=[1],
            completion_ids=[7],
            logprobs=[bad],
            finish_reason="length",
            weight_version=0,
            text="",
        )


def test_sample_rejects_empty_prompt_and_negative_ids() -> None:
    with pytest.raises(ValidationError, match="prompt_ids"):
        Sample(
            problem_id="p",
            variant="hinted",
            prompt_ids=[],
            completion_ids=[],
            logprobs=[],
            finish_reason="stop",
            weight_version=0,
            text="",
        )
    with pytest.raises(ValidationError, match="completion_ids"):
        Sample(
            problem_id="p",
            variant="hinted",
            prompt_ids=[1],
            completion_ids=[-1],
            logprobs=[-1.0],
            finish_reason="stop",
            weight_version=0,
            text="",
        )


def test_group_samples_share_problem_and_variant() -> None:
    with pytest.raises(ValidationError, match=r"samples\[1\].problem_id"):
        RawGroup(
            group_id="g",
            problem_id="p1",
            variant="unhinted",
            prompt="q",
            answer="4",
            samples=[sample("p1"), sample("p2")],
            weight_version=0,
            step=0,
            temperature=1.0,
        )
    with pytest.raises(ValidationError, match=r"samples\[0\].variant"):
        RawGroup(
            group_id="g",
            problem_id="p1",
            variant="unhinted",
            prompt="q",
            answer="4",
            samples=[sample("p1", Variant.HINTED)],
            weight_version=0,
            step=0,
            temperature=1.0,
        )
    with pytest.raises(ValidationError, match="samples"):
        RawGroup(
            group_id="g",
            problem_id="p1",
            variant="unhinted",
            prompt="q",
            answer="4",
            samples=[],
            weight_version=0,
            step=0,
            temperature=1.0,
        )


def test_group_weight_version_is_its_oldest_sample() -> None:
    samples = [sample(version=3), sample(version=2)]
    g = RawGroup(
        group_id="g",
        problem_id="p1",
        variant="unhinted",
        prompt="q",
        answer="4",
        samples=samples,
        weight_version=2,
        step=3,
        temperature=1.0,
    )
    assert g.weight_version == 2
    with pytest.raises(ValidationError, match="must be the oldest sample version"):
        RawGroup(
            group_id="g",
            problem_id="p1",
            variant="unhinted",
            prompt="q",
            answer="4",
            samples=samples,
            weight_version=3,
            step=3,
            temperature=1.0,
        )


def test_scored_group_has_one_score_per_sample() -> None:
    raw = group("g1", size=3)
    scored = ScoredGroup.from_raw(raw, [Score(reward=1.0), Score(reward=0.0), Score(reward=0.0, timed_out=True)])
    assert scored.rewards == [1.0, 0.0, 0.0]
    assert scored.group_id == raw.group_id and scored.samples == raw.samples
    with pytest.raises(ValidationError, match="2 scores for 3 samples"):
        ScoredGroup.from_raw(raw, [Score(reward=1.0)] * 2)
    with pytest.raises(ValidationError, match="reward"):
        Score(reward=2.0)


def test_round_trip_through_json() -> None:
    raw = group("g1")
    scored = ScoredGroup.from_raw(raw, [Score(reward=1.0, extracted="4")] * 2)
    for msg in (
        Problem(prompt="p", answer="1"),
        raw,
        scored,
        DeadLetter(stream="s", group="g", entry_id="1-0", data="{", error="bad", failures=3),
    ):
        assert decode(type(msg), encode(msg)) == msg
    assert json.loads(encode(raw))["schema_version"] == 1


def test_decode_refuses_unknown_schema_versions_and_fields() -> None:
    data = json.loads(encode(group("g1")))
    with pytest.raises(MessageError, match="schema_version"):
        decode(RawGroup, json.dumps({**data, "schema_version": 2}))
    with pytest.raises(MessageError, match="extra_field"):
        decode(RawGroup, json.dumps({**data, "extra_field": 1}))
    with pytest.raises(MessageError, match="not a valid RawGroup"):
        decode(RawGroup, b"not json")


def test_the_run_record_and_the_trainer_control_state_are_typed_messages() -> None:
    control = TrainerControl(version=3, buffered=2, dropped_stale=1, instance="trainer")
    assert decode(TrainerControl, encode(control)) == control
    with pytest.raises(MessageError, match="buffered"):
        decode(TrainerControl, json.dumps({**json.loads(encode(control)), "buffered": "three"}))
    ours = RunShape(group_size=8, prompts_per_step=32, max_new_tokens=512, max_staleness=1)
    theirs = ours.model_copy(update={"prompts_per_step": 16, "written_by": "rollout (pid 7)"})
    assert ours.differences(ours) == []
    assert ours.differences(theirs) == ["prompts_per_step is 32 here but 16 in the run record"]


def test_messages_are_immutable() -> None:
    p = Problem(prompt="p", answer="1")
    with pytest.raises(ValidationError):
        p.answer = "2"  # type: ignore[misc]


def test_a_group_shows_a_hint_only_when_hinted_and_only_one_its_prompt_holds() -> None:
    hinted = {**dict(group("g", variant=Variant.HINTED)), "prompt": "Q\n\nPartial solution:\nfirst steps"}
    assert RawGroup.model_validate({**hinted, "hint": "first steps"}).hint == "first steps"
    assert RawGroup.model_validate(hinted).hint is None  # a group made before the field
    with pytest.raises(ValidationError, match="only a hinted group"):
        RawGroup.model_validate({**dict(group("g")), "hint": "What"})
    for bad in ("", "other steps"):
        with pytest.raises(ValidationError, match="part of prompt"):
            RawGroup.model_validate({**hinted, "hint": bad})
    scored = ScoredGroup.from_raw(RawGroup.model_validate({**hinted, "hint": "first steps"}), [Score(reward=1.0)] * 2)
    assert decode(ScoredGroup, encode(scored)).hint == "first steps"
