"""Broadcast weight sync on the CPU engine: SGLang 0.5.23's protocol, over gloo.

    POST /init_weights_update_group      join the trainer's group (it is rank 0 and hosts
                                         the store at master_address:master_port)
    POST /begin_weight_update            open a session
    POST /update_weights_from_distributed  receive one broadcast and serve it (repeated)
    POST /end_weight_update              close the session
    POST /destroy_weights_update_group   leave the group

What SGLang does, and this does too (sglang/srt/managers/scheduler_components/
weight_updater.py, model_executor/model_runner_components/weight_updater.py): the group is
one of the engine's own, never its default group, made from a TCP store at
``master_address:master_port`` under a ``PrefixStore(group_name)``, the engine at rank
``rank_offset`` (the CPU engine is one "GPU"). A distributed update refuses to run outside
a begin/end session, a second begin while one is open and an end with none open are
refused. One update call receives one broadcast from rank 0: with ``load_format
"flattened_bucket"`` a single uint8 tensor holding the listed tensors end to end, each at
a byte offset aligned to its dtype (SGLang's ``FlattenedTensorBucket``); otherwise one
broadcast per listed tensor. The weight version is set only by a call that succeeds.

Where the CPU engine differs, on purpose: a broadcast is received whole beside the
serving weights, checked against the model (names, shapes), and only then copied in, once
the rows running have finished; a failure leaves the old weights serving (SGLang answers that its
weights are partially updated). Every collective has ``timeout_s``, so a trainer that
dies mid-broadcast costs one failed call, never a hung engine.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, TCPStore  # torch.distributed exports them untyped

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """A weight-sync call that failed; answered ``{"success": false, "message": ...}``
    with ``status``: SGLang answers 400 to every failure; here a call refused for the
    engine's state answers 409 (a session already open, or none open, a group that exists)
    and one naming a group the engine lacks 404, so that a client (or a fuzzer) can tell
    a malformed request from one that came at the wrong time. Both are errors to SGLang's
    clients too, which look at ``success``."""

    status = 400


class SyncConflict(WeightSyncError):
    status = 409


class NoSuchGroup(WeightSyncError):
    status = 404


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a broadcast, as the update call lists it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * torch.Size(self.shape).numel()


def tensor_specs(names: Any, dtypes: Any, shapes: Any) -> list[TensorSpec]:
    """The request's parallel lists as specs; WeightSyncError if they do not line up."""
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        raise WeightSyncError("'names', 'dtypes' and 'shapes' must be lists")
    if not names or not len(names) == len(dtypes) == len(shapes):
        raise WeightSyncError(f"names, dtypes and shapes must be non-empty and of one length ({len(names)} names)")
    specs = []
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise WeightSyncError(f"unknown dtype {dtype!r} for {name!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise WeightSyncError(f"shape of {name!r} must be a list of non-negative ints, not {shape!r}")
        specs.append(TensorSpec(str(name), torch_dtype, tuple(shape)))
    return specs


class WeightGroups:
    """The engine's update groups by name and its update session; thread-safe."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout = timedelta(seconds=timeout_s)
        self._groups: dict[str, Any] = {}  # group name -> ProcessGroupGloo
        self._lock = threading.Lock()
        self.session_open = False

    def init(self, master_address: str, master_port: int, rank: int, world_size: int, group_name: str) -> None:
        """Join the group; blocks until every rank has (or ``timeout_s`` passed)."""
        if not group_name:
            raise WeightSyncError("Group name cannot be empty")
        with self._lock:
            if group_name in self._groups:
                raise SyncConflict(f"The specified group name {group_name!r} has already been created")
        if not 0 < rank < world_size:
            raise WeightSyncError(f"rank {rank} must be in [1, {world_size}): rank 0 is the trainer")
        try:
            store = TCPStore(master_address, master_port, world_size, is_master=False, timeout=self.timeout)
            group = dist.ProcessGroupGloo(PrefixStore(group_name, store), rank, world_size, self.timeout)
        except Exception as exc:  # refused, timed out, a store of another protocol
            raise WeightSyncError(f"Failed to initialize custom process group: {exc}.") from exc
        with self._lock:
            self._groups[group_name] = group
        log.info("joined weight update group %s as rank %d of %d", group_name, rank, world_size)

    def destroy(self, group_name: str) -> None:
        with self._lock:
            if self._groups.pop(group_name, None) is None:
                raise NoSuchGroup("The group to be destroyed does not exist.")
        log.info("left weight update group %s", group_name)

    def begin(self) -> None:
        with self._lock:
            if self.session_open:
                raise SyncConflict("a weight-update session is already open; call end_weight_update() first")
            self.session_open = True

    def end(self) -> None:
        with self._lock:
            if not self.session_open:
                raise SyncConflict("no weight-update session is open; call begin_weight_update() first")
            self.session_open = False

    def receive(self, group_name: str, specs: list[TensorSpec], flattened: bool) -> list[tuple[str, torch.Tensor]]:
        """The tensors of one broadcast from rank 0, received whole."""
        with self._lock:
            if not self.session_open:
                raise SyncConflict(
                    "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
                )
            group = self._groups.get(group_name)
        if group is None:
            raise NoSuchGroup(
                f"Group {group_name} not in {sorted(self._groups)}. Please call `init_weights_update_group` first."
            )
        try:
            return _receive_flat(group, specs, self.timeout) if flattened else _receive_each(group, specs, self.timeout)
        except Exception as exc:  # a dead trainer, a timeout: the group is of no further use
            raise WeightSyncError(f"Failed to receive weights: {exc}") from exc


def _receive_each(group: Any, specs: list[TensorSpec], timeout: timedelta) -> list[tuple[str, torch.Tensor]]:
    out = []
    for spec in specs:
        tensor = torch.empty(spec.shape, dtype=spec.dtype)
        group.broadcast([tensor], dist.BroadcastOptions()).wait(timeout)  # rootRank 0: the trainer
        out.append((spec.name, tensor))
    return out


def _receive_flat(group: Any, specs: list[TensorSpec], timeout: timedelta) -> list[tuple[str, torch.Tensor]]:
    """SGLang's flattened bucket: the tensors' bytes end to end, each aligned to its dtype."""
    offsets, offset = [], 0
    for spec in specs:
        if offset % spec.dtype.itemsize:
            raise WeightSyncError(f"Unaligned received tensor {spec.name}: byte offset {offset}, dtype {spec.dtype}")
        offsets.append(offset)
        offset += spec.nbytes
    flat = torch.empty(offset, dtype=torch.uint8)  # [total bytes]
    group.broadcast([flat], dist.BroadcastOptions()).wait(timeout)
    return [
        (spec.name, flat[start : start + spec.nbytes].view(spec.dtype).reshape(spec.shape))
        for spec, start in zip(specs, offsets, strict=True)
    ]
