"""Every setting of a service's section is a flag of its command (services/common/settings_cli.py):
listed in --help with its docstring and default, validated like the file's values, above the
environment and the file in precedence; today's flags still work; secrets never show."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from services.cli import build_parser, main
from services.common.config import SectionSettings
from services.common.settings_cli import settings_from_args
from services.engine.settings import EngineSettings
from services.rollout.settings import RolloutSettings
from services.trainer.settings import TrainerSettings
from services.verifier.settings import VerifierSettings

MODELS: dict[str, type[SectionSettings]] = {
    "engine": EngineSettings,
    "rollout": RolloutSettings,
    "verifier": VerifierSettings,
    "trainer": TrainerSettings,
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("POPE_") or var == "REDIS_URL":
            monkeypatch.delenv(var)


def leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted name, docstring) of every leaf field, walked here independently of the generator."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += leaves(ann, f"{prefix}{name}.")
        else:
            out.append((prefix + name, info.description or ""))
    return out


def flag(dotted: str) -> str:
    return "--" + dotted.replace("_", "-")


def squash(text: str) -> str:
    return "".join(text.split())


def help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


def show(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["config", "show", *argv]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


@pytest.mark.parametrize("section", list(MODELS))
def test_help_lists_every_setting_with_its_docstring(section: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = help_of([section], capsys)
    fields = leaves(MODELS[section])
    assert len(fields) > 10
    for dotted, doc in fields:
        assert doc, f"{section}.{dotted} has no docstring"
        assert f"{flag(dotted)} " in out, f"{section} --help lacks {flag(dotted)}"
        # the help shows the docstring with its ``literals`` plain
        assert squash(doc.replace("``", "")) in squash(out), f"{section} --help lacks the docstring of {dotted}"
    # config show takes the same flags
    shown = help_of(["config", "show", section], capsys)
    assert all(f"{flag(dotted)} " in shown for dotted, _ in fields)


def test_help_shows_defaults_and_env_names(capsys: pytest.CaptureFixture[str]) -> None:
    out = squash(help_of(["trainer"], capsys))
    assert squash("default: 1e-06; env POPE_TRAINER__LEARNING_RATE") in out
    assert squash("default: 60000; env POPE_TRAINER__STREAMS__LEASE_MS") in out
    assert squash('default: {"hinted": 1.0, "unhinted": 1.0}') in out
    rollout = squash(help_of(["rollout"], capsys))
    assert squash("--hints.k INT") in rollout and squash("default: 128; env POPE_ROLLOUT__HINTS__K") in rollout


def test_a_flag_beats_env_and_file_and_env_beats_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("shared:\n  seed: 7\ntrainer:\n  learning_rate: 2.0e-6\n  warmup_steps: 5\n")
    monkeypatch.setenv("POPE_TRAINER__LEARNING_RATE", "4e-6")
    monkeypatch.setenv("POPE_TRAINER__WARMUP_STEPS", "6")
    data = show(["trainer", "--config", str(cfg), "--learning-rate", "3e-6"], capsys)
    assert (data["learning_rate"], data["warmup_steps"], data["seed"]) == (3e-6, 6, 7)
    monkeypatch.setenv("REDIS_URL", "redis://from-env:1/0")
    assert show(["trainer", "--redis-url", "redis://flag:2/0"], capsys)["redis_url"] == "redis://flag:2/0"


def test_nested_flags_merge_with_env_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer:\n  streams: {max_failures: 5, lease_ms: 1000}\n")
    monkeypatch.setenv("POPE_TRAINER__STREAMS__BLOCK_MS", "250")
    args = build_parser().parse_args(["trainer", "--config", str(cfg), "--streams.lease-ms", "30000"])
    streams = settings_from_args(TrainerSettings, args).streams
    assert (streams.lease_ms, streams.max_failures, streams.block_ms) == (30000, 5, 250)
    data = show(["rollout", "--hints.k", "16", "--evaluation.hinted", "--prompt-template.version", "1.0"], capsys)
    assert (data["hints"]["k"], data["evaluation"]["hinted"], data["prompt_template"]["version"]) == (16, True, "1.0")


def test_switches_nulls_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    data = show(["rollout", "--schedule", "false", "--include-easy", "--evaluation.limit", "3"], capsys)
    assert (data["schedule"], data["include_easy"], data["evaluation"]["limit"]) == (False, True, 3)
    argv = ["trainer", "--tensorboard-dir", "null", "--bf16", "--variant-weights", '{"hinted": 2.5}']
    data = show(argv, capsys)
    assert (data["tensorboard_dir"], data["bf16"], data["variant_weights"]) == (None, True, {"hinted": 2.5})
    assert show(["verifier", "--memory-limit-mb", "null", "--consume", "no"], capsys)["memory_limit_mb"] is None


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["trainer", "--streams.lease-ms", "soon"], ["--streams.lease-ms", "trainer.streams.lease_ms", "'soon'"]),
        (["trainer", "--learning-rate", "-1"], ["--learning-rate", "greater than 0"]),
        (["trainer", "--variant-weights", "{hinted: 1}"], ["--variant-weights", "not valid JSON"]),
        (["trainer", "--variant-weights", '{"hinted": "x"}'], ["--variant-weights", "trainer.variant_weights.hinted"]),
        (["rollout", "--hints.method", "random"], ["--hints.method", "rollout.hints.method"]),
        (["rollout", "--schedule", "maybe"], ["--schedule", "valid boolean"]),
        (["engine", "--weight-version", "-1"], ["--weight-version"]),
        (["verifier", "--workers", "many"], ["--workers"]),
    ],
)
def test_a_bad_flag_value_exits_2_naming_the_flag(
    argv: list[str], names: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (argv, ["config", "show", *argv]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"[from command-line option {names[0]}]" in err
        assert all(name in err for name in names), err


def test_an_error_names_the_option_as_typed_and_the_env_variable_when_from_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POPE_TRAINER__STREAMS__MAX_FAILURES", "0")
    assert main(["config", "show", "trainer", "--streams.lease-ms", "5"]) == 2
    assert "environment variable POPE_TRAINER__STREAMS__MAX_FAILURES" in capsys.readouterr().err


def test_todays_flags_still_work(tmp_path: Path) -> None:
    parser = build_parser()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer:\n  seed: 3\n")
    common = ["--redis-url", "redis://r:1/0", "--engine-url", "http://e:1", "--port", "9", "--host", "0.0.0.0"]
    for section in ("rollout", "trainer"):
        args = parser.parse_args([section, "--config", str(cfg), "--model", "m", *common])
        s = settings_from_args(MODELS[section], args)
        assert (s.model_path, s.redis_url, s.engine_url, s.port, s.host) == (  # type: ignore[attr-defined]
            "m",
            "redis://r:1/0",
            "http://e:1",
            9,
            "0.0.0.0",
        )
    assert settings_from_args(TrainerSettings, parser.parse_args(["trainer", "--config", str(cfg)])).seed == 3
    engine = settings_from_args(
        EngineSettings, parser.parse_args(["engine", "--model", "m", "--weight-version", "3", "--port", "1"])
    )
    assert (engine.model_path, engine.weight_version, engine.port) == ("m", 3, 1)
    args = parser.parse_args(["verifier", "--workers", "5", "--redis-url", "redis://r:1/0"])
    assert settings_from_args(VerifierSettings, args).workers == 5
    assert settings_from_args(EngineSettings, parser.parse_args(["engine", "--model-path", "n"])).model_path == "n"


def test_secrets_set_by_flag_are_never_shown(capsys: pytest.CaptureFixture[str]) -> None:
    secret = "s3cret-by-flag"
    data = show(["trainer", "--api-token", secret], capsys)
    assert data["api_token"] == "***"
    data = show(["rollout", "--verifier-token", secret, "--api-token", secret], capsys)
    assert secret not in json.dumps(data)
    assert main(["config", "show", "trainer", "--api-token", secret, "--port", "x"]) == 2
    assert secret not in capsys.readouterr().err
    args = build_parser().parse_args(["trainer", "--api-token", secret])
    settings = settings_from_args(TrainerSettings, args)
    assert settings.api_token is not None and settings.api_token.get_secret_value() == secret
    assert secret not in repr(settings)
    for section, field in (("trainer", "--api-token"), ("rollout", "--verifier-token"), ("engine", "--api-key")):
        out = help_of([section], capsys)
        entry = squash(out.split(f"  {field} ", 1)[1].split("\n  --", 1)[0].split("\n\n", 1)[0])
        assert "Secret" in entry and "default" not in entry, entry
