"""How many threads each process of ``pope up`` may run, so that together they never
oversubscribe the machine's cores.

    budget = split(cores(), engines=1, engine_threads=None, trainer_threads=None)
    budget.engine, budget.trainer              # torch intra-op threads of each process
    thread_env(budget.engine)                  # its environment (OpenMP, MKL, OpenBLAS)
    thread_env(1)                              # the rollout's and verifier's: no thread pools

The engine and the trainer do the compute; the rollout service and the verifier wait on
HTTP and Redis and score answers in Python, so they get one thread per pool. With default
thread counts every torch process starts a pool as wide as the machine: on 2 cores the
engine and the trainer each ran 2 compute threads, and their threads pre-empted each
other all through a step (nonvoluntary context switches, docs/benchmarks.md). Split
evenly, the engine takes the odd core (generation is the longer half of a step on the
demo's shapes); several engines or trainer ranks share their side's cores, one at least
each. A count the user set (``engine.torch_threads``, ``trainer.torch_threads``) is kept,
and the other side gets what remains.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """Threads of each engine process and of each trainer rank."""

    cores: int
    engine: int
    trainer: int


def cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset
    narrow), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (not on Linux)
        return os.cpu_count() or 1


def split(
    n_cores: int,
    engines: int = 1,
    engine_threads: int | None = None,
    trainer_threads: int | None = None,
    trainer_ranks: int = 1,
) -> Budget:
    """Each engine's and each trainer rank's threads on ``n_cores``: a set count as it is,
    the rest of the cores to the side left unset (split evenly when both are, the engine
    side taking the odd core), divided among that side's processes, one at least each."""
    n_cores = max(n_cores, 1)
    if engine_threads is None and trainer_threads is None:
        trainer_side = max(n_cores // 2, 1)
        engine_side = max(n_cores - trainer_side, 1)
    elif engine_threads is None:
        assert trainer_threads is not None
        trainer_side = trainer_threads * trainer_ranks
        engine_side = n_cores - trainer_side
    else:
        engine_side = engine_threads * engines
        trainer_side = n_cores - engine_side if trainer_threads is None else trainer_threads * trainer_ranks
    return Budget(
        cores=n_cores,
        engine=engine_threads if engine_threads is not None else max(engine_side // engines, 1),
        trainer=trainer_threads if trainer_threads is not None else max(trainer_side // trainer_ranks, 1),
    )


def thread_env(threads: int) -> dict[str, str]:
    """The environment that holds a process's native thread pools to ``threads``: OpenMP's
    (torch's intra-op pool follows it unless set otherwise), MKL's and OpenBLAS's; and the
    Hugging Face tokenizers' pool (Rust, rayon) off, which the rollout's tokenizer would
    otherwise open as wide as the machine."""
    n = str(threads)
    return {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "RAYON_NUM_THREADS": n,
        "TOKENIZERS_PARALLELISM": "false",
    }


def apply(threads: int | None) -> None:
    """Hold this process's torch to ``threads`` intra-op threads and one inter-op thread
    (None: torch's own choice). Call it before any torch work: the inter-op pool can be
    sized only before its first use."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already started (a second call in one process)
        torch.set_num_interop_threads(1)
