"""Settings of the CPU engine (section ``engine``; env ``POPE_ENGINE__<FIELD>``)."""

from __future__ import annotations

from pydantic import Field

from services.common.config import SectionSettings, section_config


class EngineSettings(SectionSettings):
    section = "engine"
    model_config = section_config("engine")

    port: int = Field(30000, ge=0, le=65535)
    """SGLang's default port."""
    model_path: str | None = None
    """HF-format model directory to serve (``pope model init`` makes a tiny one)."""
    weight_version: int = Field(0, ge=0)
    """Version reported for the start-up weights (SGLang's ``--weight-version``)."""
