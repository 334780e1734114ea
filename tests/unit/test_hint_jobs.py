"""A hint job's settings: the request's overrides keep HintSettings' fields and bounds, and
what is over the service's ceilings is lowered and said (pure; no Redis, no HTTP)."""

from __future__ import annotations

from typing import Any

from services.rollout.hint_jobs import HintOverrides, job_settings
from services.rollout.settings import HintSettings


def _bounds(schema: dict[str, Any]) -> dict[str, Any]:
    """Each property's constraints, whether it is T or T | None."""
    out = {}
    for name, prop in schema["properties"].items():
        branch = next((b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"), prop)
        out[name] = {k: v for k, v in branch.items() if k not in ("default", "title", "description")}
    return out


def test_the_overrides_have_every_setting_with_its_bounds() -> None:
    assert _bounds(HintOverrides.model_json_schema()) == _bounds(HintSettings.model_json_schema())


def test_unset_overrides_are_the_services_and_ceilings_are_kept() -> None:
    base = HintSettings(k=8, max_new_tokens=32768, max_fraction=0.25)
    cfg, adjusted = job_settings(base, HintOverrides(), context=4096)
    assert (cfg.k, cfg.max_new_tokens, cfg.max_fraction) == (8, 4096, 0.25)
    assert adjusted == ["max_new_tokens 32768 lowered to the model's context, 4096"]
    cfg, adjusted = job_settings(base, HintOverrides(k=2, max_new_tokens=100, max_fraction=0.5), context=4096)
    assert (cfg.k, cfg.max_new_tokens, cfg.max_fraction) == (2, 100, 0.25) and len(adjusted) == 1
    cfg, adjusted = job_settings(base, HintOverrides(max_fraction=0.1), context=None)  # no model context known
    assert (cfg.max_new_tokens, cfg.max_fraction, adjusted) == (32768, 0.1, [])
