"""Hint jobs over real HTTP and a real Redis: bounded settings, a listing, cancel (POST
.../cancel) and DELETE (cancel, then forget), and no resuming of a cancelled job after a
restart. The engine is a socket that takes connections and never answers, so a job stays
running until it is cancelled."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from services.common.http import api_app
from services.common.keys import Keys
from services.common.messages import Problem
from services.rollout.hint_jobs import HintJob, HintJobs, hint_jobs_router
from services.rollout.settings import HintSettings, RolloutSettings
from services.rollout.store import ProblemStore
from tests.conftest import app_in_thread


@pytest.fixture
def silent_engine() -> Iterator[str]:
    """A URL whose server accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def settings_for(redis_url: str, keys: Keys, model: Path, engine_url: str) -> RolloutSettings:
    return RolloutSettings(
        redis_url=redis_url, key_prefix=keys.prefix, model_path=str(model), engine_url=engine_url, schedule=False
    )


def jobs_for(settings: RolloutSettings, redis: Redis) -> HintJobs:
    from transformers import AutoTokenizer

    engine = settings.engine_client()
    return HintJobs(
        settings,
        redis,
        ProblemStore(redis, Keys(settings.key_prefix)),
        engine,
        lambda: AutoTokenizer.from_pretrained(settings.model_path),
    )


@contextlib.contextmanager
def serving_jobs(settings: RolloutSettings) -> Iterator[str]:
    """hint_jobs_router on an app under uvicorn in a thread (``app_in_thread``)."""

    def build(redis: Redis) -> FastAPI:
        app = api_app(settings)
        app.include_router(hint_jobs_router(jobs_for(settings, redis)))
        return app

    with app_in_thread(settings.redis_url, build) as url:
        yield url


@pytest.fixture
def service(redis_url: str, keys: Keys, tiny_model: Path, silent_engine: str) -> Iterator[tuple[str, RolloutSettings]]:
    import redis

    settings = settings_for(redis_url, keys, tiny_model, silent_engine)
    client = redis.Redis.from_url(redis_url)
    client.hset(keys.problems, "p1", Problem(id="p1", prompt="What is 1+1?", answer="2").model_dump_json())
    client.close()
    with serving_jobs(settings) as url:
        yield url, settings


def test_a_job_posted_empty_runs_with_the_bounded_defaults_and_delete_cancels_it(
    service: tuple[str, RolloutSettings],
) -> None:
    url, _ = service
    resp = httpx.post(f"{url}/v1/hints/jobs", json={})
    assert resp.status_code == 202, resp.text
    job = HintJob.model_validate(resp.json())
    defaults = HintSettings()
    # The tiny model's context is 4096: the paper's 32k-token default is lowered to it.
    assert job.state == "running" and job.settings.max_new_tokens == 4096
    assert job.settings.k == defaults.k and job.settings.concurrency == defaults.concurrency
    assert httpx.post(f"{url}/v1/hints/jobs", json={}).status_code == 409  # one at a time
    listed = httpx.get(f"{url}/v1/hints/jobs", params={"limit": 1}).json()
    assert [j["id"] for j in listed] == [job.id]
    resp = httpx.post(f"{url}/v1/hints/jobs/{job.id}/cancel", timeout=60)
    assert resp.status_code == 200 and resp.json()["state"] == "cancelled"
    assert httpx.get(f"{url}/v1/hints/jobs/{job.id}").json()["state"] == "cancelled"
    assert httpx.post(f"{url}/v1/hints/jobs/{job.id}/cancel").json()["state"] == "cancelled"  # as it is
    assert httpx.post(f"{url}/v1/hints/jobs/nope/cancel").status_code == 404
    again = httpx.post(f"{url}/v1/hints/jobs", json={"hints": {"k": 2}})  # the slot is free again
    assert again.status_code == 202 and again.json()["settings"]["k"] == 2
    # DELETE cancels a running job and forgets it; the slot is free after.
    assert httpx.delete(f"{url}/v1/hints/jobs/{again.json()['id']}", timeout=60).status_code == 204
    assert httpx.get(f"{url}/v1/hints/jobs/{again.json()['id']}").status_code == 404
    assert httpx.delete(f"{url}/v1/hints/jobs/{again.json()['id']}").status_code == 404
    assert httpx.delete(f"{url}/v1/hints/jobs/{job.id}").status_code == 204  # a cancelled one too
    assert httpx.get(f"{url}/v1/hints/jobs").json() == []
    third = httpx.post(f"{url}/v1/hints/jobs", json={})
    assert third.status_code == 202
    assert httpx.delete(f"{url}/v1/hints/jobs/{third.json()['id']}", timeout=60).status_code == 204


@pytest.mark.parametrize(
    "hints",
    [
        {"k": 10**6},
        {"k": 0},
        {"k_hint": 10**4},
        {"concurrency": 10**4},
        {"seed": False},
        {"max_cuts": 2.5},
        {"bogus": 1},
    ],
)
def test_unbounded_job_settings_are_refused(service: tuple[str, RolloutSettings], hints: dict[str, Any]) -> None:
    url, _ = service
    resp = httpx.post(f"{url}/v1/hints/jobs", json={"hints": hints})
    assert resp.status_code == 422, resp.text
    [error] = resp.json()["detail"]
    assert error["loc"][-1] == next(iter(hints))
    assert httpx.get(f"{url}/v1/hints/jobs").json() == []


def test_settings_over_the_services_ceilings_are_lowered_and_said(service: tuple[str, RolloutSettings]) -> None:
    url, _ = service
    asked = {"max_new_tokens": 5000, "max_fraction": 0.5, "max_cuts": 8.0}
    resp = httpx.post(f"{url}/v1/hints/jobs", json={"hints": asked})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert (job["settings"]["max_new_tokens"], job["settings"]["max_fraction"], job["settings"]["max_cuts"]) == (
        4096,
        0.25,
        8,
    )
    assert len(job["adjusted"]) == 2 and "context, 4096" in job["adjusted"][0]
    assert httpx.post(f"{url}/v1/hints/jobs/{job['id']}/cancel", timeout=60).status_code == 200


def test_bad_listing_limits_are_422(service: tuple[str, RolloutSettings]) -> None:
    url, _ = service
    for limit in (0, 10**6, "x"):
        assert httpx.get(f"{url}/v1/hints/jobs", params={"limit": limit}).status_code == 422


async def test_a_cancelled_job_is_not_resumed_after_a_restart_and_a_running_one_is(
    service: tuple[str, RolloutSettings], aredis: Redis
) -> None:
    url, settings = service
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        job = (await http.post("/v1/hints/jobs", json={})).json()
        assert (await http.post(f"/v1/hints/jobs/{job['id']}/cancel")).json()["state"] == "cancelled"
    restarted = jobs_for(settings, aredis)
    await restarted.resume_interrupted()
    assert restarted.task is None
    # A job a dead process left running is resumed, and can then be cancelled.
    left = HintJob.model_validate({**job, "id": "left-running", "state": "running"})
    await restarted._save(left)
    await restarted.resume_interrupted()
    assert restarted.running == "left-running"
    assert (await restarted.cancel("left-running")).state == "cancelled"
    assert restarted.task is not None and restarted.task.done() and restarted.running is None
    await restarted.engine.aclose()


async def test_done_and_failed_jobs_cannot_be_cancelled(service: tuple[str, RolloutSettings], aredis: Redis) -> None:
    url, settings = service
    jobs = jobs_for(settings, aredis)
    now = time.time()
    for state in ("done", "failed"):
        await jobs._save(
            HintJob(id=state, state=state, request={}, settings=HintSettings(), created_at=now, updated_at=now)
        )
    async with httpx.AsyncClient(base_url=url) as http:
        for state in ("done", "failed"):
            resp = await http.post(f"/v1/hints/jobs/{state}/cancel")
            assert resp.status_code == 409 and state in resp.json()["detail"]
            assert (await http.get(f"/v1/hints/jobs/{state}")).json()["state"] == state
    await jobs.engine.aclose()
