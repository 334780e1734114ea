"""The injector: the seeded schedule applied to the real processes, one fault at a time.

    for fault in schedule(form, seed, lease_s):
        wait until the trainer has reached fault.at_step and stepped since the previous fault
        pause fault.gap_s
        kill9:   SIGKILL the process; fault.hold_s later, start it again
        sigstop: SIGSTOP its process group; fault.hold_s (> the lease) later, SIGCONT
        one line in <run>/faults.jsonl

The trainer stops at the form's steps; where it gets there with faults still to come (a fast
machine), the run is extended: the trainer is restarted gracefully with a higher max_steps
(``ChaosStack.extend``; a quarter of the form's steps more), as it is once more for
``AFTER_LAST`` steps after the last fault. The next fault does not wait for every service
to be ready, only for a training step: a service still starting up, or a verifier replica
still down while the other carries the load, can be hit too. A fault whose process is not
running when its turn comes is logged with ``applied: false`` and not counted. A trainer that takes no step for
``progress_within_s`` while a fault waits is a finding ("stuck"); the run goes on with the
next fault.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

from redis.asyncio import Redis

from chaos.schedule import Fault, Form
from chaos.stack import PROBLEMS, ChaosStack
from services.common.keys import Keys

AFTER_LAST = 5
"""Steps the trainer must take after the last fault (the run is extended for them)."""


class Injector:
    def __init__(self, stack: ChaosStack, form: Form, lease_s: float) -> None:
        self.stack, self.form, self.lease_s = stack, form, lease_s
        self.records: list[dict[str, Any]] = []

    def run(self, faults: list[Fault]) -> list[dict[str, Any]]:
        last = 0  # the trainer's step at the previous fault
        for fault in faults:
            self._room_for(last + 1, f"fault #{fault.index} needs a step past {last}")
            if not self._reached(max(last + 1, fault.at_step), fault):
                self.stack.finding("stuck", "stack", self._stuck(fault, last))
            self.stack.sleep(fault.gap_s)
            record = self.apply(fault)
            last = max(last, record["trainer_version"] or 0)
            self.records.append(record)
            with self.stack.layout.faults.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.stack.say(f"fault #{fault.index} {fault.kind}: {record['what']}")
        self._room_for(last + AFTER_LAST, f"the stack must train {AFTER_LAST} steps past the last fault")
        return self.records

    def _room_for(self, step: int, why: str) -> None:
        """The trainer may reach ``step`` before it stops (else the run is extended: on a
        fast machine the trainer can take the form's steps before its faults are done)."""
        if step > self.stack.max_steps:
            self.stack.extend(step + max(self.form.steps // 4, AFTER_LAST), why)

    def _stepped_past(self, step: int) -> bool:
        return (self.stack.trainer_version() or 0) > step

    def _reached(self, step: int, fault: Fault) -> bool:
        """Wait until the trainer is at ``step``; False if it takes no step for
        ``progress_within_s`` on the way (stuck)."""
        while (now := self.stack.trainer_version() or 0) < step:
            if not self.stack.wait_until(
                functools.partial(self._stepped_past, now),
                self.form.progress_within_s,
                f"a training step past step {now} (fault #{fault.index} waits for step {step})",
            ):
                return False
        return True

    def _stuck(self, fault: Fault, last: int) -> str:
        status = self.stack.rollout_status() or {}
        waiting = (status.get("rollout") or {}).get("waiting_for")
        return (
            f"before fault #{fault.index} ({fault.kind}): the trainer is at step {self.stack.trainer_version()}, "
            f"no step past {last} in {self.form.progress_within_s:.0f}s after the previous fault; not ready: "
            f"{self.stack.unready() or 'none'}; the rollout service waits for: {waiting!r}; "
            f"streams: {status.get('streams')}"
        )

    def apply(self, fault: Fault) -> dict[str, Any]:
        proc = self.stack.procs[fault.target]
        record: dict[str, Any] = {
            "index": fault.index,
            "kind": fault.kind,
            "target": fault.target,
            "trainer_version": self.stack.trainer_version(),
            "at": time.time(),
            "t": round(time.monotonic() - self.stack.started_at, 2),
            "pid": proc.pid,
        }
        if not proc.running():
            return {**record, "applied": False, "what": f"not applied: {fault.target} is not running"}
        began = time.monotonic()
        if fault.action == "kill9":
            pid, leftovers = proc.kill9()
            self.stack.sleep(fault.hold_s)
            new_pid = proc.start(f"restart after fault #{fault.index}, {fault.kind}")
            record.update(
                restarted_pid=new_pid,
                down_s=round(time.monotonic() - began, 2),
                what=f"SIGKILL pid {pid}; restarted as pid {new_pid} after {time.monotonic() - began:.1f}s",
            )
            if leftovers:  # its children outlived it: reaped by the kill, reported here
                record["outlived_by"] = leftovers
                self.stack.finding(
                    "orphans",
                    fault.target,
                    f"after SIGKILL of pid {pid}, pids {leftovers} of its group were still alive",
                )
            if fault.service == "redis":
                record["problems_after_restart"] = self._problems_after_restart()
        else:
            pid = proc.pause()
            self.stack.sleep(fault.hold_s)
            proc.resume()
            record["what"] = (
                f"SIGSTOP process group {pid} for {time.monotonic() - began:.1f}s (lease {self.lease_s:.1f}s); SIGCONT"
            )
        record.update(applied=True, hold_s=fault.hold_s)
        return record

    def _problems_after_restart(self) -> int | None:
        """The problem store's size once Redis answers again: its AOF must have held it."""
        proc = self.stack.procs["redis"]
        if not self.stack.wait_until(proc.ready, 30, "redis to reload its AOF"):
            return None
        key = Keys(self.stack.key_prefix).problems

        async def count_problems(client: Redis) -> int:
            return int(await client.hlen(key))  # type: ignore[misc]

        count = self.stack.redis_call(count_problems)
        if count != len(PROBLEMS):
            self.stack.finding("aof", "redis", f"after a restart from its AOF the problem store holds {count} problems")
        return count
