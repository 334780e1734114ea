"""The verifier service: ``pope verifier --port 8001``.

Consumes RawGroups from ``pope:rollouts`` in consumer group ``verifiers`` (one stream
worker per scoring process, so every process stays busy), scores every sample with the
pool, and publishes the ScoredGroup to ``pope:scored``, committed atomically with the ack
(common.worker). Any number of verifier processes share the work; a dead one's groups
are reclaimed by the others after the lease. Also serves ``POST /v1/verify`` for ad-hoc
scoring (evaluation and the hint search; verify_api.py) with a pool of its own
(``verify_workers``), so no ad-hoc request can hold up training's scoring, and /healthz,
/readyz, /metrics.

A truncated sample (finish_reason "length") scores 0 whatever it says (DESIGN.md 1.5);
its answer is still extracted, for inspection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.http import add_health_routes, api_app, redis_unready
from services.common.http import serve as run_server
from services.common.keys import VERIFIERS, Keys
from services.common.messages import FinishReason, RawGroup, Score, ScoredGroup
from services.common.run import check_run_format
from services.common.streams import GroupReader
from services.common.worker import Effects, Worker
from services.verifier.pool import ScoringPool
from services.verifier.settings import VerifierSettings
from services.verifier.verify_api import Admission, add_verify_route

log = logging.getLogger(__name__)

SCORED = Counter("pope_verifier_scored_total", "Samples scored", ["path"])
CORRECT = Counter("pope_verifier_correct_total", "Samples scored correct", ["path"])
TIMED_OUT = Counter("pope_verifier_timed_out_total", "Samples whose scoring hit the time limit", ["path"])
ERRORS = Counter("pope_verifier_errors_total", "Samples whose scoring failed", ["path"])
GROUPS = Counter("pope_verifier_groups_total", "Groups scored from the stream")


def count(scores: list[Score], path: str) -> None:
    SCORED.labels(path).inc(len(scores))
    CORRECT.labels(path).inc(sum(s.reward > 0 for s in scores))
    TIMED_OUT.labels(path).inc(sum(s.timed_out for s in scores))
    ERRORS.labels(path).inc(sum(s.error is not None and not s.timed_out for s in scores))


async def score_group(pool: ScoringPool, group: RawGroup) -> ScoredGroup:
    """Score every sample of ``group``; the scored group records the pool's policy."""
    scores = await pool.score(group.answer, [s.text for s in group.samples])
    scores = [
        sc.model_copy(update={"reward": 0.0}) if s.finish_reason is FinishReason.LENGTH else sc
        for s, sc in zip(group.samples, scores, strict=True)
    ]
    count(scores, "stream")
    return ScoredGroup.from_raw(group, scores, pool.policy)


def create_app(settings: VerifierSettings, redis: Redis | None = None) -> FastAPI:
    keys = Keys(settings.key_prefix)
    pool = ScoringPool(settings.workers, settings.timeout_s, settings.memory_limit_mb, settings.policy)
    # Not consuming, there is no training to keep workers for: the one pool serves HTTP.
    http_pool = (
        ScoringPool(settings.verify_workers, settings.timeout_s, settings.memory_limit_mb, settings.policy)
        if settings.consume
        else pool
    )
    pools = [pool, http_pool] if http_pool is not pool else [pool]
    stop = asyncio.Event()
    instance = f"verifier-{socket.gethostname()}-{os.getpid()}"
    client = redis or Redis.from_url(settings.redis_url)

    async def handle(group: RawGroup, effects: Effects) -> None:
        effects.publish(keys.scored, await score_group(pool, group))
        GROUPS.inc()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.consume:
            try:  # an older run's keys are refused (RunMismatch) before any is read
                await check_run_format(client, keys)
            except RedisError as exc:  # the stream workers wait Redis out
                log.warning("could not check the run record yet (%s)", exc)
        await asyncio.gather(*(p.start() for p in pools))
        workers = [
            Worker(
                GroupReader(client, keys, keys.rollouts, VERIFIERS, f"{instance}-{i}", settings.streams),
                RawGroup,
                handle,
                key_of=lambda g: g.group_id,
                heartbeat=("verifier", f"{instance}-{i}"),
                # A batch's groups are scored across the whole pool, so the worker that
                # holds the last batch does not leave the other processes idle.
                concurrency=settings.workers,
            )
            for i in range(settings.workers)
        ]
        tasks = [asyncio.create_task(w.run(stop)) for w in workers] if settings.consume else []
        log.info(
            "verifier %s: %d scoring workers, %d for POST /v1/verify, scoring policy %s, consuming %s: %s",
            instance,
            settings.workers,
            http_pool.size,
            settings.policy,
            keys.rollouts,
            settings.consume,
        )
        yield
        stop.set()  # each stream worker finishes the group in hand, hands back the rest
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(p.close() for p in pools))
        if redis is None:
            await client.aclose()

    app = api_app(settings, title="POPE-RL verifier", lifespan=lifespan)
    app.state.pool, app.state.http_pool = pool, http_pool

    async def ready() -> str | None:
        if not all(p.alive() for p in pools):
            return "scoring workers are not all up"
        return await redis_unready(client)

    add_health_routes(app, ready)

    admission = Admission(settings.verify_queue, settings.verify_deadline_s)
    add_verify_route(app, http_pool, admission, settings.policy, lambda scores: count(scores, "http"))

    return app


def serve(settings: VerifierSettings) -> None:
    from services.common.logs import log_resolved_config, setup_logging

    setup_logging("verifier", settings.log_level, settings.log_format)
    log_resolved_config(settings)
    run_server(create_app(settings), settings, "verifier")
