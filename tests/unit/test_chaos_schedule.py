"""The chaos run's fault schedule: seeded, every kind in each form, stops past the lease."""

from __future__ import annotations

import collections
import itertools

import pytest

from chaos.schedule import KILLED, LONG, SHORT, STOPPED, VERIFIER_REPLICAS, Form, schedule


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    assert schedule(LONG, 7, 3.0) == schedule(LONG, 7, 3.0)
    assert schedule(LONG, 7, 3.0) != schedule(LONG, 8, 3.0)


def test_the_short_form_has_one_fault_of_each_kind() -> None:
    for seed in range(20):
        faults = schedule(SHORT, seed, 3.0)
        kills = sorted(f.service for f in faults if f.action == "kill9")
        assert kills == sorted(KILLED)
        assert [f.action for f in faults].count("sigstop") == 1
        assert len(faults) == SHORT.faults >= 6


def test_the_long_form_spreads_at_least_fifty_faults_over_every_kind() -> None:
    faults = schedule(LONG, 0, 3.0)
    kinds = collections.Counter(f.kind for f in faults)
    assert len(faults) >= 50
    assert set(kinds) == {f"kill9-{s}" for s in KILLED} | {f"sigstop-{s}" for s in STOPPED}
    assert min(kinds.values()) >= 4
    assert {f.replica for f in faults if f.service == "verifier"} == set(range(VERIFIER_REPLICAS))
    assert {f.target for f in faults if f.service == "verifier"} == {"verifier-0", "verifier-1"}


@pytest.mark.parametrize("form", [SHORT, LONG])
def test_delays_fall_in_the_forms_ranges_and_every_stop_outlasts_the_lease(form: Form) -> None:
    lease_s = 3.0
    for f in schedule(form, 1, lease_s):
        assert form.gap_s[0] <= f.gap_s <= form.gap_s[1]
        if f.action == "sigstop":
            assert f.hold_s > lease_s + form.stop_past_lease_s[0] - 0.01
        else:
            assert form.restart_after_s[0] - 0.01 <= f.hold_s <= form.restart_after_s[1] + 0.01


def test_a_form_needs_a_step_between_faults() -> None:
    with pytest.raises(ValueError, match="need more than"):
        Form("tight", 7, 1, 1, (0, 1), (0, 1), (1, 2), 60.0, 30.0)


@pytest.mark.parametrize("form", [SHORT, LONG])
def test_faults_are_spread_over_the_run_by_step_and_leave_steps_after_the_last(form: Form) -> None:
    steps = [f.at_step for f in schedule(form, 3, 3.0)]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # a step apart at least
    assert steps[0] >= 1 and steps[-1] < form.steps * 0.9  # the last leaves the stack steps to recover in
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert max(gaps) - min(gaps) <= 1  # evenly
