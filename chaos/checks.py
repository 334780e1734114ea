"""The end-of-run checks: the engine serves the trainer's last step, the last checkpoint
loads (model, optimizer, RNG, state: what a resume reads), and the ledger, built from the
durable records, accounts for every planned group."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def final_step(checkpoint_dir: Path) -> int | None:
    """The step of the newest complete checkpoint (its trainer_state.json), or None."""
    from services.trainer.checkpoint import latest, load_state

    newest = latest(checkpoint_dir)
    return load_state(newest).step if newest is not None else None


def versions_match(engine_version: int | None, checkpoint_dir: Path, steps: int) -> Check:
    trainer = final_step(checkpoint_dir)
    ok = engine_version is not None and engine_version == trainer == steps
    detail = f"engine serves v{engine_version}; the newest checkpoint is step {trainer}; the run trains {steps} steps"
    return Check("engine-version", ok, detail, {"engine": engine_version, "trainer": trainer, "steps": steps})


def checkpoint_loads(checkpoint_dir: Path) -> Check:
    """Load the newest checkpoint as the trainer's resume does: model, optimizer, RNGs, state."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.trainer.checkpoint import latest, load_optimizer, load_state, restore_rng

    newest = latest(checkpoint_dir)
    if newest is None:
        return Check("checkpoint-loads", False, f"no complete checkpoint under {checkpoint_dir}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(newest), dtype=torch.float32)
        optimizer = torch.optim.AdamW(model.parameters())
        load_optimizer(newest, optimizer)
        state = load_state(newest)
        restore_rng(newest, state)
        json.loads((newest / "run_record.json").read_text())
    except Exception as exc:  # any failure to load is the finding; say which
        return Check("checkpoint-loads", False, f"{newest} does not load: {exc!r}")
    params = sum(p.numel() for p in model.parameters())
    moments = sum(len(s) for s in optimizer.state.values())
    detail = f"{newest.name}: model ({params} parameters), optimizer ({moments} moments), RNG and state load"
    return Check("checkpoint-loads", True, detail, {"path": str(newest), "step": state.step})


def ledger(redis_url: str, key_prefix: str, plan_log: Path, checkpoint_dir: Path, archive: Path) -> Check:
    """Every planned group accounted for: trained once, or where it ended up, none lost."""
    try:
        from chaos.ledger import build_ledger
    except ImportError as exc:
        return Check("ledger", False, f"chaos.ledger cannot be imported ({exc}): no ledger, so no accounting")
    built = build_ledger(redis_url, key_prefix, plan_log, checkpoint_dir, archive)
    return Check("ledger", built.ok, built.report(), {"summary": built.summary()})
