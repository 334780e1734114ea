"""The trainer's weight sink is chosen from ``trainer.engine_url`` (and ``engine_urls``): none means no engine."""

from __future__ import annotations

from pathlib import Path

from services.trainer.fleet import Fleet
from services.trainer.settings import TrainerSettings
from services.trainer.sink import NoSink, sink_for


async def test_no_engine_url_means_no_sink() -> None:
    sink = sink_for(TrainerSettings(engine_url=""))
    assert isinstance(sink, NoSink)
    assert await sink.push(Path("step-000001"), 1) is False  # accepted, applied nowhere: pushed = 0
    assert await sink.served_versions() == [] and sink.in_use == frozenset()
    await sink.aclose()


async def test_engine_urls_make_a_fleet_of_each_once() -> None:
    settings = TrainerSettings(
        engine_url="http://127.0.0.1:9/", engine_urls=["http://127.0.0.1:10", "http://127.0.0.1:9"]
    )
    sink = sink_for(settings)
    assert isinstance(sink, Fleet) and sink.in_use == frozenset()
    assert list(sink.engines) == ["http://127.0.0.1:9", "http://127.0.0.1:10"]
    await sink.aclose()
