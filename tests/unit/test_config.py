"""Config: one YAML file, a section per service, env overrides, errors that say where."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from services.common.config import ConfigError, load_settings
from services.common.logs import JsonFormatter, log_resolved_config
from services.rollout.settings import RolloutSettings
from services.trainer.settings import TrainerSettings
from services.verifier.settings import VerifierSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for var in list(os.environ):
        if var.startswith("POPE_") or var == "REDIS_URL":
            monkeypatch.delenv(var)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pope.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_papers_settings() -> None:
    t = load_settings(TrainerSettings)
    assert (t.learning_rate, t.weight_decay, t.grad_clip, t.kl_coef) == (1e-6, 0.01, 0.3, 0.0)
    assert (t.clip_eps_low, t.clip_eps_high, t.tis_cap, t.entropy_coef) == (0.2, 0.2, None, 0.0)
    assert (t.group_size, t.prompts_per_step, t.loss_agg, t.scale_adv_by_std) == (8, 32, "constant", False)
    r = load_settings(RolloutSettings)
    assert (r.temperature, r.max_new_tokens, r.hinted_fraction, r.max_staleness) == (0.8, 16384, 0.5, 1)
    assert (r.port, load_settings(VerifierSettings).port, t.port) == (8000, 8001, 8002)
    assert t.streams.lease_ms == 60_000 and t.streams.max_failures == 3


def test_precedence_flag_env_file_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(
        tmp_path,
        """
shared:
  redis_url: redis://shared:6379/0
  max_staleness: 2
trainer:
  learning_rate: 3.0e-6
  streams: {lease_ms: 5000}
verifier:
  workers: 7
""",
    )
    t = load_settings(TrainerSettings, cfg)
    assert t.redis_url == "redis://shared:6379/0" and t.max_staleness == 2
    assert t.learning_rate == 3e-6 and t.streams.lease_ms == 5000 and t.streams.max_failures == 3
    assert load_settings(VerifierSettings, cfg).workers == 7

    monkeypatch.setenv("REDIS_URL", "redis://from-env:6379/0")
    assert load_settings(TrainerSettings, cfg).redis_url == "redis://from-env:6379/0"
    monkeypatch.setenv("POPE_TRAINER__REDIS_URL", "redis://section-env:6379/0")
    monkeypatch.setenv("POPE_TRAINER__STREAMS__LEASE_MS", "9000")
    t = load_settings(TrainerSettings, cfg)
    assert t.redis_url == "redis://section-env:6379/0" and t.streams.lease_ms == 9000
    t = load_settings(TrainerSettings, cfg, redis_url="redis://flag:1/0", port=None)
    assert t.redis_url == "redis://flag:1/0" and t.port == 8002


def test_nested_sections_merge_with_shared(tmp_path: Path) -> None:
    cfg = write(tmp_path, "shared:\n  streams: {maxlen: 1000, lease_ms: 5000}\nverifier:\n  streams: {block_ms: 200}\n")
    streams = load_settings(VerifierSettings, cfg).streams
    assert (streams.maxlen, streams.lease_ms, streams.block_ms) == (1000, 5000, 200)


def test_bad_value_in_file_names_file_section_and_field(tmp_path: Path) -> None:
    cfg = write(tmp_path, "trainer:\n  learning_rate: fast\n  streams:\n    max_failures: 0\n")
    with pytest.raises(ConfigError) as err:
        load_settings(TrainerSettings, cfg)
    text = str(err.value)
    assert f"{cfg}, section 'trainer', field 'learning_rate'" in text
    assert "trainer.streams.max_failures" in text and "'fast'" in text


def test_unknown_field_section_and_env_typo_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="learning_rat"):
        load_settings(TrainerSettings, write(tmp_path, "trainer:\n  learning_rat: 1\n"))
    with pytest.raises(ConfigError, match="unknown section 'trainr'"):
        load_settings(TrainerSettings, write(tmp_path, "trainr:\n  learning_rate: 1\n"))
    # A sub-section out of place (rollout.hints at the top) is refused, not silently ignored.
    with pytest.raises(ConfigError, match="unknown section 'hints'"):
        load_settings(RolloutSettings, write(tmp_path, "hints:\n  k: 3\n"))
    with pytest.raises(ConfigError, match="section 'trainer' must be a mapping"):
        load_settings(TrainerSettings, write(tmp_path, "trainer: 3\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(TrainerSettings, write(tmp_path, "trainer: [\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(TrainerSettings, tmp_path / "missing.yaml")
    monkeypatch.setenv("POPE_TRAINER__LEARNIN_RATE", "1")
    with pytest.raises(ConfigError, match="POPE_TRAINER__LEARNIN_RATE names no field"):
        load_settings(TrainerSettings)


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPE_ROLLOUT__TEMPERATURE", "-1")
    with pytest.raises(ConfigError, match="environment variable POPE_ROLLOUT__TEMPERATURE"):
        load_settings(RolloutSettings)


def test_resolved_config_is_logged_once_with_secrets_masked(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(TrainerSettings, api_token="s3cret")
    with caplog.at_level(logging.INFO, logger="pope.config"):
        log_resolved_config(settings)
    assert len(caplog.records) == 1
    line = JsonFormatter("trainer").format(caplog.records[0])
    parsed = json.loads(line)
    assert parsed["service"] == "trainer" and parsed["config"]["api_token"] == "***"
    assert parsed["config"]["learning_rate"] == 1e-6
    assert "s3cret" not in line and "s3cret" not in caplog.text
