"""One chaos run, start to verdict:

stack up (private Redis with AOF, engine, 2 verifiers, trainer, rollout); problems in
inject the seeded faults while it trains
wait for the trainer's last step, the engine on it, the pipeline quiet
stop the services (Redis stays up)
check: engine version == trainer's, the last checkpoint loads, the ledger balances
stop Redis; write <run>/chaos.json; 0 when every check passed and nothing misbehaved
"""

from __future__ import annotations

import collections
import json
import re
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from chaos.checks import Check, checkpoint_loads, final_version, ledger, versions_match
from chaos.injector import Injector
from chaos.schedule import Form, schedule
from chaos.stack import ChaosStack, Layout

SETTLE_WITHIN_S = 90.0  # after the last step: the engine on it, the pipeline drained


def run(
    form: Form,
    seed: int,
    run_dir: Path,
    allow_crashes: bool = False,
    out: TextIO = sys.stdout,
    trainer_nproc: int = 1,
    engines: int = 1,
) -> int:
    from services.common.config import load_settings
    from services.trainer.settings import TrainerSettings

    began = time.monotonic()
    layout = Layout(run_dir)
    layout.reset()
    stack = ChaosStack.create(layout, form, out, began, trainer_nproc, engines)
    lease_s = load_settings(TrainerSettings, layout.config).streams.lease_ms / 1000
    faults = schedule(form, seed, lease_s, engines)
    stack.say(
        f"{form.name} form, seed {seed}: {len(faults)} faults over {form.steps} steps; lease {lease_s:.1f}s; "
        f"trainer ranks {trainer_nproc}; engines {engines}{' behind the router' if engines > 1 else ''}"
    )
    checks: list[Check] = []
    records: list[dict[str, Any]] = []
    to_ledger: float | None = None
    try:
        stack.start()
        records = Injector(stack, form, lease_s).run(faults)
        trained = wait_trained(stack, form, began)
        checks.append(trained)
        engine_version = settle(stack, form) if trained.ok else stack.engine_version()
        stack.stop_services()
        checks.append(versions_match(engine_version, layout.checkpoints, stack.max_steps))
        checks.append(checkpoint_loads(layout.checkpoints))
        to_ledger = time.monotonic() - began
        stack.say(f"building the ledger ({to_ledger:.0f}s into the run)")
        checks.append(
            ledger(
                stack.redis_url,
                stack.key_prefix,
                layout.rollouts / "plan.jsonl",
                layout.checkpoints,
                layout.rollouts / "rollouts.jsonl",
            )
        )
    except Exception as exc:
        checks.append(Check("run", False, f"the run did not finish: {exc!r}\n{traceback.format_exc()[-3000:]}"))
    finally:
        stack.stop_all()  # Redis too, last: the ledger is built (or the run failed)
    summary = summarize(stack, form, seed, records, checks, allow_crashes, time.monotonic() - began, to_ledger)
    summary["ledger"] = next(({"report": c.detail, **c.data} for c in checks if c.name == "ledger"), None)
    layout.summary.write_text(json.dumps(summary, indent=2))
    print_summary(summary, out)
    return 0 if summary["ok"] else 1


def wait_trained(stack: ChaosStack, form: Form, began: float) -> Check:
    """Until the trainer's step is the run's last (the form's, or more if it was extended),
    within the form's wall-time budget."""
    left = form.deadline_s - (time.monotonic() - began)
    steps = stack.max_steps
    done = stack.wait_until(
        lambda: (stack.trainer_version() or 0) >= steps, max(left, 0.0), f"the trainer's step {steps}"
    )
    if done:
        extended = f" (extended from {form.steps})" if steps > form.steps else ""
        return Check("trained", True, f"the trainer reached step {steps}{extended} in {time.monotonic() - began:.0f}s")
    status = stack.rollout_status() or {}
    rollout, trainer = status.get("rollout") or {}, status.get("trainer") or {}
    detail = (
        f"the trainer is at step {stack.trainer_version()} of {steps} after {form.deadline_s:.0f}s; "
        f"the rollout service waits for {rollout.get('waiting_for')!r} (rollout step {rollout.get('step')}); "
        f"the trainer buffers {trainer.get('buffered')} groups; the engine serves "
        f"v{(status.get('engine') or {}).get('weight_version')}; streams {status.get('streams')}; "
        f"not ready: {stack.unready() or 'none'}"
    )
    return Check("trained", False, detail)


def settle(stack: ChaosStack, form: Form) -> str | None:
    """Wait for every service to be ready, the engine to serve the last step and the
    pipeline to drain (every raw group scored and archived, the scheduler waiting for the
    trainer); return the engine's version. Not settling is a finding, not a reason to stop
    checking."""

    # A service the last fault restarted may still be starting: a stop then would find it
    # before its SIGTERM handler exists (an unclean stop of the harness's making, not a finding).
    if not stack.wait_until(lambda: not stack.unready(), SETTLE_WITHIN_S, "every service to be ready"):
        stack.finding("not-ready", "stack", f"after {SETTLE_WITHIN_S:.0f}s not ready: {stack.unready()}")

    def last_served() -> bool:
        return stack.engine_version() == final_version(stack.layout.checkpoints)

    if not stack.wait_until(last_served, SETTLE_WITHIN_S, "the engine's last version"):
        stack.finding(
            "version",
            "engine",
            f"serves v{stack.engine_version()}, not the trainer's last v{final_version(stack.layout.checkpoints)}",
        )
    if not stack.wait_until(lambda: _quiet(stack), SETTLE_WITHIN_S, "the pipeline to drain"):
        stack.finding("not-drained", "stack", f"consumer groups after {SETTLE_WITHIN_S:.0f}s: {_groups(stack)}")
    return stack.engine_version()


def _quiet(stack: ChaosStack) -> bool:
    groups = _groups(stack)
    status = stack.rollout_status() or {}
    waiting = str((status.get("rollout") or {}).get("waiting_for") or "")
    busy = [g for g in ("rollouts/verifiers", "scored/archivers") if groups.get(g) != {"pending": 0, "lag": 0}]
    return not busy and waiting.startswith("trainer")


def _groups(stack: ChaosStack) -> dict[str, dict[str, int] | None]:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    from services.common.keys import ARCHIVERS, TRAINERS, VERIFIERS, Keys
    from services.common.streams import group_info

    keys = Keys(stack.key_prefix)

    async def read(client: Redis) -> dict[str, dict[str, int] | None]:
        return {
            "rollouts/verifiers": await group_info(client, keys.rollouts, VERIFIERS),
            "scored/archivers": await group_info(client, keys.scored, ARCHIVERS),
            "scored/trainers": await group_info(client, keys.scored, TRAINERS),
        }

    try:
        return stack.redis_call(read)
    except (RedisError, OSError):
        return {}


def summarize(
    stack: ChaosStack,
    form: Form,
    seed: int,
    records: list[dict[str, Any]],
    checks: list[Check],
    allow_crashes: bool,
    wall_s: float,
    to_ledger: float | None,
) -> dict[str, Any]:
    applied = [r for r in records if r.get("applied")]
    by_kind = collections.Counter(r["kind"] for r in applied)
    crashes = [f for f in stack.findings if f.kind == "uninjected-exit"]
    failing = [f for f in stack.findings if f.kind != "uninjected-exit" or not allow_crashes]
    enough = len(applied) >= form.faults
    checks = [*checks, Check("faults", enough, f"{len(applied)} of {form.faults} planned faults applied")]
    return {
        "form": form.name,
        "seed": seed,
        "steps": stack.max_steps,
        "ok": all(c.ok for c in checks) and not failing,
        "wall_s": round(wall_s, 1),
        "seconds_to_ledger": round(to_ledger, 1) if to_ledger is not None else None,
        "faults_by_kind": dict(sorted(by_kind.items())),
        "faults_not_applied": [r for r in records if not r.get("applied")],
        "checks": [asdict(c) for c in checks],
        "findings": [asdict(f) for f in stack.findings],
        "uninjected_exits": len(crashes),
        "starts": {name: p.starts for name, p in stack.procs.items()},
        "log_errors": log_errors(stack.layout.logs),
    }


def log_errors(logs: Path) -> dict[str, dict[str, Any]]:
    """Per service log: how many ERROR lines and tracebacks, and the distinct ERROR messages."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(logs.glob("*.log")):
        text = path.read_text(errors="replace")
        errors = [line for line in text.splitlines() if re.search(r"\bERROR\b|CRITICAL", line)]
        # The same error at other times is one message: drop the time stamp and numbers.
        distinct = collections.Counter(re.sub(r"\d+", "N", e.split(" ", 2)[-1])[:300] for e in errors)
        out[path.stem] = {
            "errors": len(errors),
            "tracebacks": text.count("Traceback (most recent call last)"),
            "messages": dict(distinct.most_common(20)),
        }
    return out


def print_summary(summary: dict[str, Any], out: TextIO) -> None:
    print(
        f"\nchaos run ({summary['form']} form, seed {summary['seed']}): {'PASS' if summary['ok'] else 'FAIL'}", file=out
    )
    print(f"  wall time {summary['wall_s']}s (to the ledger: {summary['seconds_to_ledger']}s)", file=out)
    print(f"  faults applied: {summary['faults_by_kind']}", file=out)
    for c in summary["checks"]:
        print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}", file=out)
    for f in summary["findings"]:
        print(f"  finding ({f['kind']}, {f['service']}): {f['detail']}", file=out)
    print(
        f"  logs with errors: { {k: v['errors'] for k, v in summary['log_errors'].items() if v['errors']} }", file=out
    )
