"""Every engine of the run kept on the trainer's weights: the trainer's ``WeightSink``
(sink.py) over one engine or many, the engine registry and SGLang's router (DESIGN.md 8).

    fleet = Fleet(settings, redis)                   # trainer.engine_url + engine_urls (+ discovery)
    await fleet.push(path, step, lineage)            # every live engine loads it; True if all did
    await fleet.reconcile(path, step, history)       # every repush_interval_s: check, re-push, route
    await fleet.served_versions()                    # what each reachable engine serves
    fleet.in_use                                     # directories an engine serves or is loading

The trainer pushes each new version to every engine directly (the router fans nothing
out). While it loads, an engine is ``updating`` and stays routed: its requests wait for the
load, as SGLang's disk update makes them. An engine the checks cannot reach
``engine_dead_after`` times in a row (or a push cannot reach) is ``dead``; one serving
weights past ``max_staleness``, of a lost lineage, or not the trainer's (a restarted engine
serves its start-up weights; a new one has loaded nothing yet; someone loaded weights of a
name the trainer never issued) is ``lagging``, and loaded again. An engine found paused
(``/ready``) that this fleet did not leave paused is continued, counted and logged. Neither is
routed: with a router (``router_url``) the fleet owns its worker list, which holds exactly
the ``serving`` and ``updating`` engines; a lagging or returning engine is loaded first
and joins after. Each check and push writes every engine's record to the registry
(services.common.engines), which the rollout service reads for the versions generation
may meet, and ``/v1/status`` shows. A Redis or router failure is logged and mended at the
next check; it never fails a step.

All calls happen under the trainer's weights lock (loop.py), one at a time: a check never
runs while this fleet is pushing, so an engine busy loading is never judged dead for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.engine_client import EngineClient, EngineError
from services.common.engines import EngineRecord, EngineState, Registry
from services.common.keys import Keys
from services.common.messages import Lineage, parse_version, utc_now, version_name
from services.common.router_client import RouterClient, RouterError
from services.trainer import broadcast
from services.trainer.operations import Ranks
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 5.0
"""A check's /model_info must answer within this."""

UNPAUSED = Counter(
    "pope_trainer_engines_unpaused_total", "Engines found paused by someone other than the trainer, and continued"
)
FALLBACKS = Counter(
    "pope_trainer_weight_sync_fallbacks_total", "Broadcast pushes to an engine that failed and went by disk instead"
)


@dataclass
class Engine:
    """What the fleet knows of one engine."""

    url: str
    client: EngineClient  # pushes: SGLang's load can take minutes
    probe: EngineClient  # checks: short, never retried
    discovered: bool = False  # found by DNS (forgotten when DNS drops it), not configured
    state: EngineState = EngineState.LAGGING
    weight_version: str | None = None
    routed: bool = False
    failures: int = 0
    error: str | None = None
    since: datetime = field(default_factory=utc_now)
    served: Path | None = None  # the directory this fleet last had it load
    loading: Path | None = None
    held: bool = False  # paused by an in-flight update whose continue did not get through
    group: broadcast.Connection | None = None  # its weight update group (weight_sync broadcast)

    def set_state(self, state: EngineState) -> None:
        if state is not self.state:
            routine = {state, self.state} == {EngineState.SERVING, EngineState.UPDATING}  # every push
            log.log(
                logging.DEBUG if routine else logging.INFO,
                "engine %s: %s -> %s",
                self.url,
                self.state.value,
                state.value,
            )
            self.state, self.since = state, utc_now()

    def record(self) -> EngineRecord:
        return EngineRecord(
            url=self.url,
            state=self.state,
            weight_version=self.weight_version,
            routed=self.routed,
            failures=self.failures,
            error=self.error,
            since=self.since,
        )


class Fleet:
    """The trainer's engines; see the module docstring."""

    def __init__(
        self,
        settings: TrainerSettings,
        redis: Redis | None,
        router: RouterClient | None = None,
    ) -> None:
        self.settings = settings
        self.registry = Registry(redis, Keys(settings.key_prefix)) if redis is not None else None
        if router is None and settings.router_url:
            key = settings.router_admin_key.get_secret_value() if settings.router_admin_key else None
            router = RouterClient(settings.router_url, admin_key=key)
        self.router = router
        self.engines: dict[str, Engine] = {}
        for url in settings.engine_list():
            self._add(url, discovered=False)
        self.history = Lineage()
        self.current: tuple[int, int] = (0, 0)
        self._forgotten: set[str] = set()  # to take out of the router and the registry

    def _add(self, url: str, *, discovered: bool) -> Engine:
        key, admin = self.settings.engine_keys()
        engine = Engine(
            url,
            EngineClient(url, api_key=key, admin_key=admin, retries=2),
            EngineClient(url, api_key=key, admin_key=admin, retries=0, timeout=CHECK_TIMEOUT_S),
            discovered=discovered,
        )
        self.engines[url] = engine
        return engine

    def bind(self, ranks: Ranks, dtype: torch.dtype, history: Lineage) -> None:
        """The trainer's ranks and serving dtype (for ``weight_sync: broadcast``) and its
        lineage (a push may come before the first check)."""
        self.ranks, self.dtype, self.history = ranks, dtype, history

    ranks: Ranks | None = None
    dtype: torch.dtype = torch.float32

    # The WeightSink protocol.
    @property
    def in_use(self) -> frozenset[Path]:
        return frozenset(p for e in self.engines.values() for p in (e.served, e.loading) if p is not None)

    async def push(self, path: Path, step: int, lineage: int = 0) -> bool:
        """Every engine but the dead loads ``path`` as (``step``, ``lineage``), at once;
        True when every one of them did (and there was one)."""
        self.current = (step, lineage)
        targets = [e for e in self.engines.values() if e.state is not EngineState.DEAD]
        if not targets:
            await self._settle()
            return False
        for e in targets:
            e.set_state(EngineState.UPDATING)
        await self._publish()
        by_disk = targets
        if self.settings.weight_sync == "broadcast" and self.ranks is not None:
            by_disk = await self._broadcast(targets, step, lineage)
        done = await asyncio.gather(*(self._load(e, path, step, lineage) for e in by_disk))
        await self._settle()
        return all(done)

    async def served_versions(self) -> list[tuple[int, int]]:
        """(step, lineage) of what each engine that answers serves, as the trainer names
        versions (an engine serving a name it does not know is left out)."""
        await self._discover()
        await asyncio.gather(*(self._check(e, count=False) for e in self.engines.values()))
        versions = []
        for e in self.engines.values():
            with contextlib.suppress(ValueError):
                if e.failures == 0 and e.weight_version is not None:
                    versions.append(parse_version(e.weight_version))
        return versions

    async def reconcile(self, path: Path | None, step: int, history: Lineage) -> bool:
        """Check every engine, load the current weights (``path``, version ``step`` of
        ``history``) into each that answers and serves anything else, and put the router
        and the registry right. True when every engine not dead answered and serves them
        (and there is one)."""
        self.history, self.current = history, (step, history.id)
        await self._discover()
        await asyncio.gather(*(self._check(e) for e in self.engines.values()))
        behind = [e for e in self.engines.values() if e.state is not EngineState.DEAD and not self._current(e)]
        if path is not None and behind:
            for e in behind:
                log.warning(
                    "engine %s serves v%s, the trainer is at v%s: loading %s",
                    e.url,
                    e.weight_version,
                    version_name(*self.current),
                    path,
                )
            await self._settle()  # the lagging leave the router before they load
            await asyncio.gather(*(self._load(e, path, step, history.id) for e in behind))
        await self._settle()
        live = [e for e in self.engines.values() if e.state is not EngineState.DEAD]
        return bool(live) and all(self._current(e) and e.failures == 0 for e in live)

    async def aclose(self) -> None:
        for e in self.engines.values():
            if e.group is not None:
                await e.group.close(timeout_s=5.0)
            await e.client.aclose()
            await e.probe.aclose()
        if self.router is not None:
            await self.router.aclose()

    # One engine.
    def _current(self, e: Engine) -> bool:
        return e.weight_version == version_name(*self.current)

    def _judge(self, e: Engine) -> EngineState:
        """SERVING when what ``e`` serves may still be sampled from, else LAGGING."""
        if self._current(e):
            return EngineState.SERVING
        if e.weight_version is None:
            return EngineState.LAGGING  # not known yet (starting up, say)
        try:
            step, lineage = parse_version(e.weight_version)
        except ValueError:
            return EngineState.LAGGING  # not a version the trainer issued
        if lineage == self.current[1] and step > self.current[0]:
            return EngineState.LAGGING  # ahead of the trainer: not its weights
        fresh = self.current[0] - step <= self.settings.max_staleness
        return EngineState.SERVING if fresh and self.history.holds(step, lineage) else EngineState.LAGGING

    def _failed(self, e: Engine, what: str, exc: EngineError, count: bool = True) -> None:
        """After a failed check or push: unreachable counts towards dead; an answer that
        refuses (a load that failed, 503 while starting) is an engine that lives."""
        e.error = f"{what}: {exc}"
        if exc.status is None:
            e.failures += count
            if what == "push" or e.failures >= self.settings.engine_dead_after:
                e.set_state(EngineState.DEAD)  # a push has already retried
                return
            if e.state is not EngineState.UPDATING:
                return  # one missed check: as it was
        elif what == "check":
            e.weight_version = None  # it answers, but not what it serves (503 while it starts)
        e.set_state(self._judge(e))

    async def _check(self, e: Engine, count: bool = True) -> None:
        """Ask ``e`` what it serves; ``count``: an unreachable engine is a step nearer dead
        (the start-up look, which the first check follows at once, does not count)."""
        try:
            info = await e.probe.model_info()
        except EngineError as exc:
            self._failed(e, "check", exc, count)
            return
        e.failures, e.error, e.weight_version = 0, None, info.weight_version
        # Paused by this fleet, which could not say continue, or (/ready 503 while it serves:
        # SGLang's) by someone else: nothing pauses an engine between two of this fleet's
        # calls, which hold the weights lock, so a pause seen here is a stall to undo.
        ours = e.held
        if ours or await e.probe.ready() is False:
            why = "an in-flight update had left it paused" if ours else "someone else had paused it"
            try:
                await e.probe.resume()
                e.held = False
                if ours:
                    log.info("engine %s: generation continued (%s)", e.url, why)
                else:
                    UNPAUSED.inc()
                    log.warning("engine %s: generation continued (%s)", e.url, why)
            except EngineError as exc:
                log.warning("engine %s: still paused (%s): %s", e.url, why, exc)
        e.set_state(self._judge(e))

    async def _load(self, e: Engine, path: Path, step: int, lineage: int) -> bool:
        e.set_state(EngineState.UPDATING)
        e.loading = path  # protected from pruning from the moment the engine may read it
        try:
            if self.settings.in_flight_updates:
                await self._load_in_flight(e, path, step, lineage)
            else:
                await e.client.update_weights_from_disk(str(path), step, lineage=lineage)
        except EngineError as exc:
            log.warning(
                "engine %s: loading v%s failed (retried at the next check): %s", e.url, version_name(step, lineage), exc
            )
            e.loading = None
            self._failed(e, "push", exc)
            return False
        e.served, e.loading = path, None
        e.failures, e.error, e.weight_version = 0, None, version_name(step, lineage)
        e.set_state(self._judge(e))
        return True

    async def _broadcast(self, targets: list[Engine], step: int, lineage: int) -> list[Engine]:
        """Broadcast the weights to ``targets`` (broadcast.py, a group per engine, opened on
        first use); the engines it failed for, each counted and logged, for the disk to load.
        The engines are paused around it (``in_flight_pause``; continued whatever it did):
        each bucket is swapped in as it arrives, and no token may come from a mix of two
        versions' buckets, so held requests go on only once the whole version is in."""
        assert self.ranks is not None
        cfg = self.settings
        for e in targets:
            if e.group is None:
                try:
                    host = cfg.broadcast_host or broadcast.reachable_address(e.url)
                    e.group = await broadcast.connect(e.client, host, cfg.broadcast_timeout_s)
                except (broadcast.BroadcastError, OSError) as exc:
                    log.warning("engine %s: no weight update group (%s); by disk instead", e.url, exc)
        live = [e for e in targets if e.group is not None]
        held = live
        errors: dict[str, Exception | None] = {}
        try:
            for e in held:
                e.held = True  # continued below, or at the next check
                await e.client.pause(cfg.in_flight_pause)
            groups = [e.group for e in live if e.group is not None]
            errors = await broadcast.push_broadcast(
                groups, self.ranks, self.dtype, step, lineage, cfg.broadcast_bucket_mb << 20, cfg.broadcast_timeout_s
            )
        except EngineError as exc:  # a pause that failed: nothing was broadcast
            errors = {e.url: exc for e in live}
        finally:
            for e in held:
                with contextlib.suppress(EngineError):
                    await e.client.resume()
                    e.held = False
        fallback = [e for e in targets if e.group is None or errors.get(e.url, KeyError(e.url)) is not None]
        for e in live:
            if errors.get(e.url, KeyError(e.url)) is None:
                e.failures, e.error, e.weight_version = 0, None, version_name(step, lineage)
                e.set_state(self._judge(e))
        for e in fallback:
            FALLBACKS.inc()
            if e.group is not None:
                log.warning("engine %s: broadcast failed (%s); loading from disk", e.url, errors.get(e.url))
                await e.group.close(timeout_s=5.0)  # of no use after a failure
                e.group = None
        return fallback

    async def _load_in_flight(self, e: Engine, path: Path, step: int, lineage: int) -> None:
        """Pause (holding the requests), load, continue: the held requests go on with the new
        weights. The engine is never left paused by this: continue is sent whatever the load
        did (an engine that cannot be reached for it is judged at the next check)."""
        e.held = True  # a pause whose answer is lost may still have paused it
        try:
            await e.client.pause(self.settings.in_flight_pause)
            await e.client.update_weights_from_disk(str(path), step, lineage=lineage)
        finally:
            try:
                await e.client.resume()
                e.held = False
            except EngineError as exc:
                e.held = True  # sent again at each check until it gets through
                log.warning("engine %s: continue_generation after an in-flight update failed: %s", e.url, exc)

    # The fleet.
    async def _discover(self) -> None:
        """Engines of ``engine_discovery``'s DNS name: new addresses are added (lagging until
        loaded), vanished ones forgotten. A failed lookup changes nothing."""
        target = self.settings.engine_discovery
        if not target:
            return
        host, _, port = target.rpartition(":")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            log.warning("engine discovery: cannot resolve %s (%s); keeping the engines known", target, exc)
            return
        found = {_url(str(info[4][0]), int(port)) for info in infos}
        for url in sorted(found - set(self.engines)):
            log.info("engine discovery: new engine %s", url)
            self._add(url, discovered=True)
            self._forgotten.discard(url)
        for url in [u for u, e in self.engines.items() if e.discovered and u not in found]:
            log.info("engine discovery: %s is gone", url)
            e = self.engines.pop(url)
            self._forgotten.add(url)
            await e.client.aclose()
            await e.probe.aclose()

    async def _settle(self) -> None:
        await self._route()
        await self._publish()

    async def _route(self) -> None:
        """The router's workers: exactly the serving and updating engines."""
        routable = {EngineState.SERVING, EngineState.UPDATING}
        if self.router is None:  # generation reaches the one engine whenever it can serve
            for e in self.engines.values():
                e.routed = e.state in routable
            return
        try:
            workers = await self.router.workers()
        except RouterError as exc:
            log.warning("router: cannot list its workers (%s); routing is put right at the next check", exc)
            return
        key = self.settings.engine_api_key.get_secret_value() if self.settings.engine_api_key else None
        for url in sorted(set(workers) - set(self.engines)):
            log.warning("router: %s is a worker but not an engine of this trainer: removing it", url)
            with contextlib.suppress(RouterError):
                await self.router.remove(url)
        for e in self.engines.values():
            want, have = e.state in routable, e.url in workers
            try:
                if want and not have:
                    await self.router.add(e.url, key)
                    log.info("router: %s joined (serves v%s)", e.url, e.weight_version)
                elif have and not want:
                    await self.router.remove(e.url)
                    log.warning("router: %s left (%s, serves v%s)", e.url, e.state.value, e.weight_version)
                e.routed = want
            except RouterError as exc:
                e.routed = have
                log.warning(
                    "router: could not %s %s (%s); again at the next check", "add" if want else "remove", e.url, exc
                )

    async def _publish(self) -> None:
        if self.registry is None:
            return
        try:
            await self.registry.put([e.record() for e in self.engines.values()])
            known = {r.url for r in await self.registry.all()}
            if stale := (known - set(self.engines)) | (self._forgotten & known):
                await self.registry.remove(*stale)
            self._forgotten.clear()
        except RedisError as exc:
            log.warning("engine registry: not written (%s); again at the next check", exc)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
