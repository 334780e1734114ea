"""A process's thread budget (services/common/threads.py) as torch sees it: set at start,
before any torch work, in a fresh process as each service is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, torch
from services.common import threads
threads.apply({threads})
print(json.dumps([torch.get_num_threads(), torch.get_num_interop_threads()]))
"""


def _threads_in_a_fresh_process(threads: int | None, env: dict[str, str] | None = None) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(threads=threads)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    counts: list[int] = json.loads(out.stdout.strip().splitlines()[-1])
    return counts


def test_a_budget_holds_torch_to_its_intra_op_threads_and_one_inter_op_thread() -> None:
    assert _threads_in_a_fresh_process(1) == [1, 1]


def test_no_budget_leaves_torch_its_own_choice() -> None:
    intra, _ = _threads_in_a_fresh_process(None, {"OMP_NUM_THREADS": "1"})
    assert intra == 1  # what OpenMP's variable (thread_env's) says, untouched by apply
