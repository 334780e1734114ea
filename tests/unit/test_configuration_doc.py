"""docs/configuration.md is generated from the settings models; it must match them."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import SECTIONS, SETTING_ALIASES, _settings_model, main
from services.common.config import flag_name, setting_fields
from services.common.settings_cli import env_name, render_docs

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
REGENERATE = "make config-docs (or: pope config docs > docs/configuration.md)"


def test_configuration_doc_is_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "docs"]) == 0
    generated = capsys.readouterr().out
    assert DOC.is_file(), f"docs/configuration.md is missing; generate it with: {REGENERATE}"
    assert DOC.read_text() == generated, f"docs/configuration.md is out of date; regenerate it with: {REGENERATE}"


def test_the_doc_has_every_setting_with_its_flag_env_and_docstring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPE_TRAINER__LEARNING_RATE", "5e-6")  # the environment changes no default shown
    text = render_docs([_settings_model(s) for s in SECTIONS], SETTING_ALIASES)
    for section in SECTIONS:
        model = _settings_model(section)
        assert f"## `{section}`" in text
        for setting in setting_fields(model):
            assert f"`{env_name(model, setting)}" in text and setting.doc in text
            if not setting.nested:
                assert f"- **`{setting.dotted}`**" in text and f"`{flag_name(setting.path)}`" in text
    assert "default `1e-06`" in text and "## The `shared` section" in text and "`--model`" in text
