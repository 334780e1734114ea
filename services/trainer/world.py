"""The trainer's processes: one under ``pope trainer``, N under torchrun (``--nproc N``).

    rank 0    the service: Redis, HTTP, the ledger, checkpoints' metadata; sends each
              operation (train these groups, write the engine directory, write the resume
              state, stop) to the others as JSON, then does its own part
    rank k>0  follows: receives an operation, does its part of it, waits for the next

Every rank holds a shard of the policy (FSDP2) and takes part in each operation's
collectives in the same order, which is why only rank 0 decides what happens next and the
others follow it. Operations travel as JSON bytes in a uint8 tensor on a gloo group of
their own, whose timeout is a week: a follower waits for the next step as long as rank 0
waits for data, while the training collectives keep torch's default timeout. Nothing
pickled crosses between ranks.

A step's rows are shared out by tokens (``share_rows``), each rank runs the same number of
micro-batches (``step.py`` pads the short ones with a masked row) and the gradients are
summed over ranks: the step is the one a single process takes on all the rows.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# A follower waits on the operations group for as long as rank 0 idles (no data, a stop).
_OPERATIONS_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class World:
    """This process's place among the trainer's: rank, size, and the torch device it trains on."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"
    operations: Any = None  # the gloo group operations travel on (None in one process)

    @property
    def distributed(self) -> bool:
        return self.operations is not None

    @property
    def leader(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True in a process torchrun started (its environment names a world)."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def join(device: str) -> World:
    """This process's World: a single one unless torchrun started it, then the process
    group (gloo for CPU tensors, NCCL for CUDA ones), this rank's device (``cuda`` becomes
    ``cuda:<local rank>``) and the operations group."""
    if not launched_by_torchrun():
        return World(device=device)
    import torch.distributed as dist

    die_with_launcher()
    local = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    operations = dist.new_group(backend="gloo", timeout=_OPERATIONS_TIMEOUT)
    world = World(rank=dist.get_rank(), size=dist.get_world_size(), device=device, operations=operations)
    log.info("trainer rank %d of %d on %s", world.rank, world.size, device)
    return world


def leave(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


def send(world: World, message: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0: ``message`` to every rank; the others: the message rank 0 sent (a JSON object)."""
    import torch.distributed as dist

    if world.leader:
        payload = json.dumps(message, separators=(",", ":")).encode()
        size = torch.tensor([len(payload)], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=world.operations)
    buffer = (
        torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        if world.leader
        else torch.empty(int(size.item()), dtype=torch.uint8)
    )
    dist.broadcast(buffer, src=0, group=world.operations)
    if world.leader:
        assert message is not None
        return message
    received: dict[str, Any] = json.loads(buffer.numpy().tobytes())
    return received


def share_rows(lengths: list[int], size: int) -> list[list[int]]:
    """Indices of the rows each of ``size`` ranks trains, balanced by tokens: longest row
    first, each to the rank with the fewest tokens so far (the lowest rank on a tie); each
    rank's indices in their original order. The same on every rank (no randomness)."""
    load = [0] * size
    shares: list[list[int]] = [[] for _ in range(size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(size), key=lambda r: (load[r], r))
        shares[rank].append(i)
        load[rank] += lengths[i]
    return [sorted(s) for s in shares]


def all_sum(world: World, values: torch.Tensor) -> torch.Tensor:
    """``values`` (float64, CPU) summed over ranks (itself in one process)."""
    if not world.distributed:
        return values
    import torch.distributed as dist

    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=world.operations)
    return values


def all_max(world: World, value: float) -> float:
    if not world.distributed:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=world.operations)
    return float(t.item())


def die_with_launcher() -> None:
    """Have the kernel SIGKILL this rank when torchrun goes: a launcher killed outright
    (kill -9, OOM) does not stop its workers, and a rank 0 left behind would go on holding
    the port and the trainers' consumer. Linux only; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    from services.common.children import PR_SET_PDEATHSIG

    launcher = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):
        return
    if launcher == 1 or os.getppid() != launcher:  # it went before the request took hold
        os.kill(os.getpid(), signal.SIGKILL)
