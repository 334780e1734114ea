"""What rank 0 asks of the policy, done on every rank in the same order (world.py).

    Ranks(policy).train(groups, version)          one GRPO step
    Ranks(policy).save_weights(...)               the engine's model directory (rank 0 writes)
    Ranks(policy).stream_weights(dtype, consume)  the full weights to ``consume`` (rank 0)
    Ranks(policy).save_resume(...)                the sharded resume state
    Ranks(policy).stop()                          the followers return
    follow(policy)                                ranks > 0: do what rank 0 sends until stop

In one process ``Ranks`` does each operation here and sends nothing: the trainer's loop and
``pope trainer replay`` use one code path at any world size. Operations are JSON (the
groups as the messages module's JSON); an operation's collectives run in the calling
thread, one operation at a time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from services.common.messages import ScoredGroup
from services.trainer import checkpoint, policy
from services.trainer.checkpoint import TrainerState
from services.trainer.policy import Policy
from services.trainer.world import send

log = logging.getLogger(__name__)

T = TypeVar("T")


class Ranks:
    """Rank 0's handle on the policy across ranks."""

    def __init__(self, p: Policy) -> None:
        self.policy = p
        self.world = p.world
        self._lock = threading.Lock()  # one operation on the wire at a time
        self._stopped = False

    def _send(self, operation: dict[str, Any]) -> None:
        if self.world.distributed:
            send(self.world, operation)

    def train(self, groups: list[ScoredGroup], version: int) -> dict[str, float]:
        with self._lock:
            self._send({"op": "train", "version": version, "groups": [g.model_dump(mode="json") for g in groups]})
            return policy.train(self.policy, groups, version)

    def save_weights(self, root: Path, step: int, lineage: int, dtype: torch.dtype, shard_bytes: int) -> Path:
        with self._lock:
            self._send({"op": "weights", "dtype": str(dtype).removeprefix("torch.")})
            p = self.policy
            return checkpoint.save_weights(
                root, p.lm, p.tokenizer, step, lineage, dtype, shard_bytes, policy.engine_tensors(p, dtype)
            )

    def stream_weights(self, dtype: torch.dtype, consume: Callable[[Iterator[tuple[str, torch.Tensor]]], T]) -> T:
        """``consume(tensors)`` on rank 0 with the full weights by Hugging Face name, one
        at a time as they are gathered (``policy.engine_tensors``), while the followers
        gather in step: the followers' part is a weights write's. Whatever ``consume``
        leaves unread (it stopped, or raised) is gathered to the end here, since the
        followers finish the collective only if rank 0 does."""
        with self._lock:
            self._send({"op": "weights", "dtype": str(dtype).removeprefix("torch.")})
            tensors = policy.engine_tensors(self.policy, dtype)
            try:
                return consume(tensors)
            finally:
                for _ in tensors:
                    pass

    def save_resume(self, root: Path, state: TrainerState, run_record: dict[str, Any], keep: int) -> Path:
        with self._lock:
            tmp = checkpoint.begin_resume(root, state.step)
            self._send({"op": "resume", "dir": str(tmp)})
            policy.save_resume(self.policy, tmp)
            p = self.policy
            return checkpoint.finish_resume(tmp, root, p.lm, p.tokenizer, state, run_record, keep)

    def stop(self, wait_s: float = 5.0) -> None:
        """Release the followers. An operation still running (a cancelled step) is waited
        for up to ``wait_s``; after that the followers are left to fail on their own when
        this process exits (torchrun then ends them)."""
        if self._stopped or not self.world.distributed:
            return
        if self._lock.acquire(timeout=wait_s):
            try:
                send(self.world, {"op": "stop"})
                self._stopped = True
            finally:
                self._lock.release()


def follow(p: Policy) -> None:
    """A follower's life: do each operation rank 0 sends, until it sends stop."""
    while True:
        operation = send(p.world, None)
        op = operation["op"]
        if op == "stop":
            return
        if op == "train":
            groups = [ScoredGroup.model_validate(g) for g in operation["groups"]]
            policy.train(p, groups, int(operation["version"]))
        elif op == "weights":
            for _ in policy.engine_tensors(p, getattr(torch, operation["dtype"])):
                pass  # the gather is collective; rank 0 writes
        elif op == "resume":
            policy.save_resume(p, Path(operation["dir"]))
        else:
            raise ValueError(f"rank {p.world.rank}: unknown operation {op!r} from rank 0")
