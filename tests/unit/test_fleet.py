"""The fleet's judgement of one engine: which weights may still be sampled from (serving),
which not (lagging), and when an engine that does not answer is dead."""

from __future__ import annotations

import pytest

from services.common.engine_client import EngineError
from services.common.engines import EngineRecord, EngineState, routed_versions
from services.common.messages import Lineage
from services.trainer.fleet import Fleet
from services.trainer.settings import TrainerSettings


def fleet(**kw: object) -> Fleet:
    settings = TrainerSettings(engine_url="http://127.0.0.1:9", max_staleness=1, engine_dead_after=2, **kw)  # type: ignore[arg-type]
    f = Fleet(settings, None)
    f.current, f.history = (10, 1), Lineage().fork(1, 7)
    return f


@pytest.mark.parametrize(
    ("served", "state"),
    [
        ("10@1", EngineState.SERVING),  # the trainer's
        ("9@1", EngineState.SERVING),  # one behind: within max_staleness
        ("8@1", EngineState.LAGGING),  # past it
        ("7", EngineState.LAGGING),  # lineage 0 at the fork, but 3 behind
        ("9", EngineState.LAGGING),  # lineage 0 past the fork: lost in the rewind
        ("11@1", EngineState.LAGGING),  # ahead of the trainer: not its weights
        ("abc", EngineState.LAGGING),  # not a version the trainer names
        (None, EngineState.LAGGING),  # unknown (starting up)
    ],
)
def test_what_an_engine_serves_decides_serving_or_lagging(served: str | None, state: EngineState) -> None:
    f = fleet()
    e = f.engines["http://127.0.0.1:9"]
    e.weight_version = served
    assert f._judge(e) is state


def test_held_by_the_lineage_within_staleness_serves() -> None:
    f = fleet()
    f.current, f.history = (8, 1), Lineage().fork(1, 7)
    e = f.engines["http://127.0.0.1:9"]
    e.weight_version = "7"  # lineage 1 holds lineage 0 up to its fork
    assert f._judge(e) is EngineState.SERVING


def test_missed_checks_make_an_engine_dead_a_push_at_once_and_a_503_unknown() -> None:
    f = fleet()
    e = f.engines["http://127.0.0.1:9"]
    e.weight_version, e.state = "10@1", EngineState.SERVING
    unreachable = EngineError("cannot reach the engine", None)
    f._failed(e, "check", unreachable)
    assert e.state is EngineState.SERVING and e.failures == 1  # one missed check: as it was
    f._failed(e, "check", unreachable)
    assert e.state is EngineState.DEAD

    e.failures, e.state = 0, EngineState.UPDATING
    f._failed(e, "push", unreachable)  # the push already retried
    assert e.state is EngineState.DEAD

    e.failures, e.state = 0, EngineState.DEAD
    f._failed(e, "check", EngineError("not ready (503)", 503))  # it answers: alive, serving what?
    assert e.state is EngineState.LAGGING and e.weight_version is None and e.failures == 0

    e.weight_version, e.state = "9@1", EngineState.UPDATING
    f._failed(e, "push", EngineError("weight update failed", 400))  # the old weights still serve
    assert e.state is EngineState.SERVING and e.weight_version == "9@1"


def test_the_routed_versions_are_those_of_serving_and_updating_engines() -> None:
    records = [
        EngineRecord(url="a", state=EngineState.SERVING, weight_version="4", routed=True),
        EngineRecord(url="b", state=EngineState.UPDATING, weight_version="3", routed=True),
        EngineRecord(url="c", state=EngineState.LAGGING, weight_version="0", routed=False),
        EngineRecord(url="d", state=EngineState.DEAD, weight_version="4", routed=False),
        EngineRecord(url="e", state=EngineState.SERVING, weight_version="x", routed=True),
    ]
    assert routed_versions(records) == [(4, 0), (3, 0), None]
