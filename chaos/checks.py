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


def final_version(checkpoint_dir: Path) -> str | None:
    """The weight version name ("400", "400@3") of the newest complete resume state, or None."""
    from services.common.messages import version_name
    from services.trainer.checkpoint import latest, load_state

    newest = latest(checkpoint_dir)
    if newest is None:
        return None
    state = load_state(newest)
    return version_name(state.step, state.history.id)


def versions_match(engine_version: str | None, checkpoint_dir: Path, steps: int) -> Check:
    """The engine serves the trainer's last version, lineage and all, and it is the run's last step."""
    from services.common.messages import parse_version

    trainer = final_version(checkpoint_dir)
    ok = engine_version is not None and engine_version == trainer and parse_version(trainer)[0] == steps
    detail = f"engine serves v{engine_version}; the newest checkpoint is v{trainer}; the run trains {steps} steps"
    return Check("engine-version", ok, detail, {"engine": engine_version, "trainer": trainer, "steps": steps})


def checkpoint_loads(checkpoint_dir: Path) -> Check:
    """Load the newest checkpoint as the trainer's resume does: model, optimizer, RNGs, state."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.trainer import policy
    from services.trainer.checkpoint import latest, weights_versions
    from services.trainer.settings import TrainerSettings
    from services.trainer.world import World

    newest = latest(checkpoint_dir)
    if newest is None:
        return Check("checkpoint-loads", False, f"no complete checkpoint under {checkpoint_dir}")
    try:
        loaded = policy.build(TrainerSettings(checkpoint_dir=checkpoint_dir), World(), newest)
        assert loaded.resumed is not None
        state = loaded.resumed
        json.loads((newest / "run_record.json").read_text())
    except Exception as exc:  # any failure to load is the finding; say which
        return Check("checkpoint-loads", False, f"{newest} does not load: {exc!r}")
    model, optimizer = loaded.lm, loaded.optimizer
    params = sum(p.numel() for p in model.parameters())
    moments = sum(len(s) for s in optimizer.state.values())
    served = weights_versions(checkpoint_dir).get((state.step, state.history.id))
    if served is None:
        return Check("checkpoint-loads", False, f"{newest.name} has no engine directory for its version")
    try:  # what the engine loads: the model alone, the master weights' values in the serving dtype
        engine_model = AutoModelForCausalLM.from_pretrained(str(served))
    except Exception as exc:
        return Check("checkpoint-loads", False, f"{served} does not load: {exc!r}")
    same = all(
        torch.equal(a.to(b.dtype), b)
        for a, b in zip(model.state_dict().values(), engine_model.state_dict().values(), strict=True)
    )
    if not same:
        return Check("checkpoint-loads", False, f"{served} does not hold the weights of {newest.name}")
    detail = (
        f"{newest.name}: model ({params} parameters), optimizer ({moments} moments), RNG and state load; "
        f"{served.name} (the engine's) loads and holds the same weights"
    )
    return Check("checkpoint-loads", True, detail, {"path": str(newest), "step": state.step, "engine_dir": str(served)})


def ledger(redis_url: str, key_prefix: str, plan_log: Path, checkpoint_dir: Path, archive: Path) -> Check:
    """Every planned group accounted for: trained once, or where it ended up, none lost."""
    try:
        from chaos.ledger import build_ledger
    except ImportError as exc:
        return Check("ledger", False, f"chaos.ledger cannot be imported ({exc}): no ledger, so no accounting")
    built = build_ledger(redis_url, key_prefix, plan_log, checkpoint_dir, archive)
    return Check("ledger", built.ok, built.report(), {"summary": built.summary()})
