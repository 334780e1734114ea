"""The trainer's weight sink is chosen from ``trainer.engine_url``: empty means no engine."""

from __future__ import annotations

from pathlib import Path

from services.trainer.settings import TrainerSettings
from services.trainer.sink import EngineSink, NoSink, sink_for


async def test_no_engine_url_means_no_sink() -> None:
    sink = sink_for(TrainerSettings(engine_url=""))
    assert isinstance(sink, NoSink)
    assert await sink.push(Path("step-000001"), 1) is False  # accepted, applied nowhere: pushed = 0
    assert await sink.served_version() is None and sink.in_use == frozenset()
    await sink.aclose()


async def test_an_engine_url_means_an_engine_sink() -> None:
    sink = sink_for(TrainerSettings(engine_url="http://127.0.0.1:9"))
    assert isinstance(sink, EngineSink) and sink.in_use == frozenset()
    await sink.aclose()
