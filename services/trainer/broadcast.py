"""Broadcast weight sync, the trainer's side: new weights to engines over a torch process
group instead of through a model directory on disk (DESIGN.md 8).

    conn = await connect(engine_client, master_address, timeout_s)   # per engine, once
    errors = await push_broadcast([conn, ...], ranks, dtype, step, lineage, bucket_bytes, timeout_s)
    errors[conn.url]        # None: the engine serves version_name(step, lineage); else why not
    await conn.close()

One process group per engine, of two ranks: the trainer's rank 0 (rank 0 of the trainer
hosts the group's TCP store) and the engine at rank 1. SGLang's protocol allows one group
of every engine GPU at once, but a group's size is fixed when it is made, and engines come
and go (a crash, a restart, one more added by the fleet): with one group per engine a dead
or new engine never forces tearing down and re-forming the others', and a slow or dead
one fails its own calls only. The price is that rank 0 sends each bucket once per engine,
in turn, rather than once to all; at a few engines that is the cheaper trade.

A push opens a session on each engine (``/begin_weight_update``), streams the weights in
flattened buckets of about ``bucket_bytes`` (SGLang's ``load_format="flattened_bucket"``:
one uint8 tensor of the bucket's tensors end to end, aligned to their dtype), each bucket
one ``/update_weights_from_distributed`` call answered once that broadcast arrived, and
closes the session (``/end_weight_update``). The HTTP call and the broadcast run at once,
the broadcast in a thread. The weights come from ``Ranks.stream_weights``: under FSDP
every rank gathers them tensor by tensor, and buckets leave as they fill, so rank 0 never
holds more than one bucket beside the model. Only the last bucket's call names the new
version, so an engine never reports a version it holds only part of (an engine may still
decode between two buckets on weights of both: at the default 512 MiB most models of
interest here are a few buckets).

Every HTTP call and every collective has ``timeout_s``. An engine that fails is reported in
the result and left out of the rest of the push; its group is then of no use (a broadcast
may be pending on it): the caller closes the connection, connects anew, or falls back to
``/update_weights_from_disk``. The CPU engine speaks this protocol over gloo; SGLang on
GPUs would need backend "nccl" and CUDA tensors, which this module does not do yet.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, TCPStore  # torch.distributed exports them untyped

from services.common.engine_client import EngineClient, EngineError
from services.common.messages import version_name
from services.trainer.operations import Ranks

log = logging.getLogger(__name__)

T = TypeVar("T")


class BroadcastError(RuntimeError):
    """A broadcast weight sync with one engine failed; the caller falls back to disk."""


@dataclass
class Bucket:
    """Tensors end to end in one uint8 tensor, as SGLang's FlattenedTensorBucket lays them."""

    names: list[str]
    dtypes: list[str]  # torch's names: "float32"
    shapes: list[list[int]]
    flat: torch.Tensor  # [total bytes] uint8


def buckets(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[tuple[Bucket, bool]]:
    """The named tensors packed into buckets of at most ``bucket_bytes`` (a larger tensor
    is a bucket of its own), each with whether it is the last. A bucket is made as soon
    as the next tensor does not fit, so at most one bucket's tensors are held at once."""
    ready: Bucket | None = None
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        # SGLang's receiver needs each tensor at an offset aligned to its dtype.
        if pending and (size + nbytes > bucket_bytes or size % tensor.element_size()):
            if ready is not None:
                yield ready, False
            ready, pending, size = _pack(pending), [], 0
        pending.append((name, tensor))
        size += nbytes
    if pending:
        if ready is not None:
            yield ready, False
        ready = _pack(pending)
    if ready is not None:
        yield ready, True


def _pack(named: list[tuple[str, torch.Tensor]]) -> Bucket:
    flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in named])  # [bytes]
    return Bucket(
        names=[n for n, _ in named],
        dtypes=[str(t.dtype).removeprefix("torch.") for _, t in named],
        shapes=[list(t.shape) for _, t in named],
        flat=flat,
    )


def in_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``fn(*args)`` in a daemon thread of its own, as a future of this loop. Not the
    loop's executor: a collective that waits out its timeout must not hold up exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting side
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=f"broadcast-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return future


def reachable_address(engine_url: str) -> str:
    """This machine's address on the route to ``engine_url``'s host (127.0.0.1 for a local
    engine): what the engine can reach the trainer's store at. No packet is sent."""
    host = urlsplit(engine_url).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(host), 9))  # UDP: only picks the route
        return str(probe.getsockname()[0])


class Connection:
    """One engine's weight update group, trainer side (rank 0 of two)."""

    def __init__(self, engine: EngineClient, group: Any, group_name: str, store: Any) -> None:
        self.engine, self.group, self.group_name = engine, group, group_name
        self._store = store  # the group's rendezvous; kept alive as long as the group

    @property
    def url(self) -> str:
        return self.engine.base_url

    def broadcast(self, flat: torch.Tensor, timeout: timedelta) -> None:
        """Send ``flat`` to the engine (rank 0 is the source)."""
        self.group.broadcast([flat], dist.BroadcastOptions()).wait(timeout)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Have the engine leave the group (an engine that is gone is fine: logged)."""
        try:
            await self.engine.destroy_weights_update_group(self.group_name, timeout_s=timeout_s)
        except EngineError as exc:
            log.info("could not destroy weight update group %s at %s: %s", self.group_name, self.url, exc)
        self.group = self._store = None


async def connect(engine: EngineClient, master_address: str, timeout_s: float) -> Connection:
    """Open a weight update group with ``engine``: rank 0 here, hosting its store at
    ``master_address`` on a free port, the engine at rank 1. The engine's init call
    answers only once both ranks joined, so it runs while this side joins."""
    timeout = timedelta(seconds=timeout_s)
    store = TCPStore(master_address, 0, 2, is_master=True, timeout=timeout, wait_for_workers=False)
    name = f"pope-{uuid.uuid4().hex[:12]}"  # fresh: an engine may hold a group of a trainer that died
    joined = in_thread(dist.ProcessGroupGloo, PrefixStore(name, store), 0, 2, timeout)
    try:
        await engine.init_weights_update_group(
            master_address, store.port, 1, 2, name, backend="gloo", timeout_s=timeout_s
        )
        group = await asyncio.wait_for(joined, timeout_s)
    except (EngineError, TimeoutError, RuntimeError) as exc:
        raise BroadcastError(f"cannot open a weight update group with {engine.base_url}: {exc}") from exc
    log.info("weight update group %s open with %s (store %s:%d)", name, engine.base_url, master_address, store.port)
    return Connection(engine, group, name, store)


async def push_broadcast(
    connections: list[Connection],
    ranks: Ranks,
    dtype: torch.dtype,
    step: int,
    lineage: int,
    bucket_bytes: int,
    timeout_s: float,
) -> dict[str, Exception | None]:
    """Broadcast the policy's weights (in ``dtype``) to every connection's engine, to be
    served as ``version_name(step, lineage)``; url -> None where that worked, else the
    error. The weights are gathered once (a collective on every trainer rank) and each
    bucket is sent to every engine still in the push, in turn."""
    errors: dict[str, Exception | None] = {c.url: None for c in connections}
    timeout = timedelta(seconds=timeout_s)

    def fail(conn: Connection, what: str, exc: BaseException) -> None:
        errors[conn.url] = BroadcastError(f"broadcast of v{version_name(step, lineage)} to {conn.url}: {what}: {exc}")
        log.warning("%s", errors[conn.url])

    begun = await asyncio.gather(
        *(c.engine.begin_weight_update(timeout_s=timeout_s) for c in connections), return_exceptions=True
    )
    live = [c for c, r in zip(connections, begun, strict=True) if not isinstance(r, BaseException)]
    for conn, outcome in zip(connections, begun, strict=True):
        if isinstance(outcome, BaseException):
            fail(conn, "begin_weight_update", outcome)
    opened = list(live)

    async def send(conn: Connection, bucket: Bucket, last: bool) -> None:
        body = conn.engine.update_weights_from_distributed_payload(
            bucket.names,
            bucket.dtypes,
            bucket.shapes,
            conn.group_name,
            weight_version=step if last else None,
            lineage=lineage,
        )
        call = asyncio.ensure_future(conn.engine.update_weights_from_distributed(body, timeout_s=timeout_s))
        sent = in_thread(conn.broadcast, bucket.flat, timeout)
        # Either failing first ends this engine's push: the other may wait out its timeout.
        parts: set[asyncio.Future[Any]] = {call, sent}
        done, _ = await asyncio.wait(parts, return_when=asyncio.FIRST_EXCEPTION)
        sent.add_done_callback(lambda f: f.cancelled() or f.exception())  # its error is reported below, or moot
        for part, what in ((sent, "broadcast"), (call, "update_weights_from_distributed")):
            if part in done and part.exception() is not None:
                call.cancel()
                raise BroadcastError(f"{what}: {part.exception()}")
        await call  # the broadcast is out; the engine answers once it has loaded it

    async def to_each(bucket: Bucket, last: bool) -> None:
        for conn in list(live):
            try:
                await send(conn, bucket, last)
            except BroadcastError as exc:
                live.remove(conn)
                fail(conn, "bucket of " + ", ".join(bucket.names[:3]) + ("..." if len(bucket.names) > 3 else ""), exc)

    loop = asyncio.get_running_loop()

    def consume(tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        for bucket, last in buckets(tensors, bucket_bytes):
            if live:  # else still gathered to the end: the followers are in the collective
                asyncio.run_coroutine_threadsafe(to_each(bucket, last), loop).result()

    try:
        await asyncio.to_thread(ranks.stream_weights, dtype, consume)
    except Exception as exc:  # the gather itself failed: no engine has the whole version
        for conn in live:
            fail(conn, "gathering the weights", exc)
        live.clear()
    ended = await asyncio.gather(
        *(c.engine.end_weight_update(timeout_s=timeout_s) for c in opened), return_exceptions=True
    )
    for conn, outcome in zip(opened, ended, strict=True):
        if isinstance(outcome, BaseException) and errors[conn.url] is None:
            fail(conn, "end_weight_update", outcome)
    return errors
