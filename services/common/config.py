"""Configuration: one YAML file with a section per service, plus the environment.

    # pope.yaml
    shared:                 # defaults for every section that has the field
      redis_url: redis://redis:6379/0
    trainer:
      learning_rate: 1.0e-6
    verifier:
      workers: 4

Each service validates its own section with its own settings model (a subclass of
``SectionSettings``). Precedence, highest first:

    1. explicit values (command-line flags)       pope trainer --port 9002
    2. POPE_<SECTION>__<FIELD>[__<SUB>]            POPE_TRAINER__STREAMS__LEASE_MS=30000
    3. REDIS_URL (for ``redis_url`` only)
    4. the file's section, then its ``shared`` section
    5. the field's default

A bad value fails start-up with a ``ConfigError`` naming where it came from: the file,
section and field, or the environment variable, or the flag. Every setting, nested ones
too (``setting_fields``), is a flag of its service's command (services/common/settings_cli.py)
and is listed in docs/configuration.md, both generated from the field docstrings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from services.common.keys import DEFAULT_PREFIX
from services.common.streams import DeliveryPolicy

# Top-level keys a config file may have: a section per service and ``shared``. Any other
# key is a typo (or a sub-section out of place, like ``hints:`` for ``rollout.hints``): an error.
KNOWN_SECTIONS = frozenset({"shared", "engine", "rollout", "verifier", "trainer"})
SHARED = "shared"


class ConfigError(ValueError):
    """The configuration is invalid; the message says where each bad value came from."""


def section_config(section: str) -> SettingsConfigDict:
    """The model_config for the settings of ``section``: env prefix POPE_<SECTION>__."""
    return SettingsConfigDict(
        env_prefix=f"POPE_{section.upper()}__",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )


# The YAML section being loaded; set by ``load_settings`` for the duration of one load.
_yaml_values: ContextVar[dict[str, Any] | None] = ContextVar("_yaml_values", default=None)


class _YamlSection(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is overridden; this is never used

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_values.get() or {})


class _RedisUrlEnv(PydanticBaseSettingsSource):
    """The conventional REDIS_URL, honoured below POPE_<SECTION>__REDIS_URL."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError

    def __call__(self) -> dict[str, Any]:
        url = os.environ.get("REDIS_URL")
        has_field = "redis_url" in self.settings_cls.model_fields
        return {"redis_url": url} if url and has_field else {}


class SectionSettings(BaseSettings):
    """Base of every section's settings: where to listen and how to log."""

    section: ClassVar[str]
    model_config = SettingsConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Interface the HTTP server binds; 0.0.0.0 in containers."""
    port: int = Field(0, ge=0, le=65535)
    """HTTP port (each service sets its default: rollout 8000, verifier 8001, trainer 8002)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log threshold."""
    log_format: Literal["text", "json"] = "text"
    """'json' writes one JSON object per line (for log shippers); 'text' is for people."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _RedisUrlEnv(settings_cls), _YamlSection(settings_cls))


class ServiceSettings(SectionSettings):
    """Base of the settings of every service that talks over Redis."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the streams, the problem store and shared state (REDIS_URL is honoured)."""
    key_prefix: str = Field(DEFAULT_PREFIX, min_length=1)
    """Prefix of every stream and key, so several runs can share one Redis."""
    api_token: SecretStr | None = Field(None, min_length=1)
    """When set, every mutating HTTP endpoint (POST, PUT, PATCH, DELETE) needs
    'Authorization: Bearer <token>' ("Bearer" in any case, RFC 6750). An empty one is an
    error, not a token that an empty header would match."""
    require_auth_for_reads: bool = False
    """With ``api_token`` set, the reads need the token too: problems with their solutions,
    hints and eval answers, rollouts, jobs, training state. Health, readiness, metrics and the
    API's own description (/docs, /openapi.json) stay open, as SGLang leaves /health and
    /metrics: probes and scrapers carry no secret, and they show no data. Off on a laptop; on in
    docker-compose and the Kubernetes manifests."""
    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Largest request body taken; a larger one is answered 413 (checked against
    Content-Length, then counted as it arrives, so nothing over it is buffered)."""
    streams: DeliveryPolicy = Field(default_factory=DeliveryPolicy)
    """Stream caps, leases, retries and dead-lettering."""


S = TypeVar("S", bound=SectionSettings)


def read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and shape-check a config file: a mapping of known sections to mappings."""
    try:
        with path.open() as f:  # from the file object, so YAML errors name the file
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for name, body in raw.items():
        if name not in KNOWN_SECTIONS:
            raise ConfigError(
                f"config file {path}: unknown section {name!r} (known: {', '.join(sorted(KNOWN_SECTIONS))})"
            )
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"config file {path}: section {name!r} must be a mapping, got {type(body).__name__}")
    return {name: body or {} for name, body in raw.items()}


def load_settings(model: type[S], config_file: Path | str | None = None, **explicit: Any) -> S:
    """Build ``model`` from flags (``explicit``; None values are ignored), env and file."""
    flags = {k: v for k, v in explicit.items() if v is not None}
    return load_settings_with_flags(model, config_file, flags)


def load_settings_with_flags(
    model: type[S],
    config_file: Path | str | None,
    flags: dict[str, Any],
    flag_names: Mapping[tuple[str, ...], str] | None = None,
) -> S:
    """Build ``model`` from ``flags`` (nested like the file's section: ``{"streams":
    {"lease_ms": 1}}``; a None is a value), env and file. ``flag_names`` names the option
    each setting path came from, for error messages (default ``--field-name``)."""
    section = model.section
    path = Path(config_file) if config_file else None
    sections = read_config_file(path) if path else {}
    shared = {k: v for k, v in sections.get(SHARED, {}).items() if k in model.model_fields}
    from_file = _deep_merge(shared, sections.get(section, {}))
    _check_env_names(model)
    token = _yaml_values.set(from_file)
    try:
        return model(**flags)
    except ValidationError as exc:
        raise ConfigError(_explain(model, exc, path, sections, flags, flag_names or {})) from None
    finally:
        _yaml_values.reset(token)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, merging nested mappings (``streams:`` in both sections)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_env_names(model: type[SectionSettings]) -> None:
    """A POPE_<SECTION>__ variable that names no field is a typo, not something to ignore."""
    prefix = str(model.model_config.get("env_prefix", "")).upper()
    fields = {name.upper() for name in model.model_fields}
    for var in os.environ:
        if var.upper().startswith(prefix):
            field = var[len(prefix) :].split("__", 1)[0].upper()
            if field not in fields:
                raise ConfigError(
                    f"environment variable {var} names no field of section "
                    f"{model.section!r} (fields: {', '.join(sorted(model.model_fields))})"
                )


def _explain(
    model: type[SectionSettings],
    exc: ValidationError,
    path: Path | None,
    sections: dict[str, dict[str, Any]],
    flags: dict[str, Any],
    flag_names: Mapping[tuple[str, ...], str],
) -> str:
    section = model.section
    env = EnvSettingsSource(model)()
    prefix = str(model.model_config.get("env_prefix", ""))
    fields = {s.path: s for s in setting_fields(model)}
    lines = [f"invalid configuration for section {section!r}:"]
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        # The setting the error is about: the longest prefix of loc that is a setting (one
        # more part for an unknown key under a nested section); loc goes on into a value.
        n = 0
        while n < len(loc) and loc[: n + 1] in fields:
            n += 1
        if n < len(loc) and (n == 0 or fields[loc[:n]].nested):
            n += 1
        key, dotted = loc[:n], ".".join(loc)
        if _given(flags, loc):
            origin = f"command-line option {flag_names.get(key) or flag_name(key)}"
        elif _given(env, loc):
            origin = f"environment variable {prefix}{'__'.join(loc).upper()}"
        elif loc[:1] == ("redis_url",) and os.environ.get("REDIS_URL"):
            origin = "environment variable REDIS_URL"
        elif _given(sections.get(section, {}), loc):
            origin = f"{path}, section {section!r}, field {dotted!r}"
        elif _given(sections.get(SHARED, {}), loc):
            origin = f"{path}, section {SHARED!r}, field {dotted!r}"
        else:
            origin = f"field {dotted!r}"
        shown = "input" in err and not isinstance(err["input"], dict) and not (key in fields and fields[key].secret)
        got = f" (got {err['input']!r})" if shown else ""
        lines.append(f"  {section}.{dotted}: {err['msg']}{got} [from {origin}]")
    return "\n".join(lines)


def _given(data: Any, loc: tuple[str, ...]) -> bool:
    """Whether ``data`` (a source's values, nested) holds the value at ``loc``, or above it."""
    for part in loc:
        if not isinstance(data, dict):
            return True
        if part not in data:
            return False
        data = data[part]
    return True


def flag_name(path: tuple[str, ...]) -> str:
    """The command-line option of a setting: ``("streams", "lease_ms")`` is ``--streams.lease-ms``."""
    return "--" + ".".join(part.replace("_", "-") for part in path)


def _members(annotation: Any) -> tuple[Any, ...]:
    """The types of a union annotation (``int | None``: int, NoneType), or the annotation."""
    if get_origin(annotation) in (Union, UnionType):
        return get_args(annotation)
    return (annotation,)


@dataclass(frozen=True)
class Setting:
    """One setting of a section, at any depth: ``path`` from the section down
    (``("streams", "lease_ms")``); ``nested`` when it is itself a model of settings."""

    path: tuple[str, ...]
    info: FieldInfo
    default: Any
    """The default value (for a nested setting, its default model's value; PydanticUndefined when required)."""

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def doc(self) -> str:
        return " ".join((self.info.description or "").split())

    @property
    def nested(self) -> bool:
        ann = self.info.annotation
        return isinstance(ann, type) and issubclass(ann, BaseModel)

    @property
    def secret(self) -> bool:
        return SecretStr in _members(self.info.annotation)

    @property
    def optional(self) -> bool:
        return type(None) in _members(self.info.annotation)

    @property
    def types(self) -> tuple[Any, ...]:
        """The annotation's types but None."""
        return tuple(t for t in _members(self.info.annotation) if t is not type(None))

    @property
    def is_bool(self) -> bool:
        return self.types == (bool,)

    @property
    def is_json(self) -> bool:
        """Given as JSON on the command line and in the environment: mappings, lists, ..."""
        scalar = (str, int, float, bool, Path, SecretStr)
        return not all(t in scalar or get_origin(t) is Literal for t in self.types)


def setting_fields(model: type[BaseModel], _path: tuple[str, ...] = (), _defaults: Any = None) -> list[Setting]:
    """Every setting of ``model``, depth first, each nested section before its settings."""
    out: list[Setting] = []
    for name, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True) if _defaults is None else getattr(_defaults, name)
        setting = Setting((*_path, name), info, default)
        out.append(setting)
        if setting.nested:
            out.extend(setting_fields(info.annotation, setting.path, default))  # type: ignore[arg-type]
    return out


def resolved(settings: SectionSettings) -> dict[str, Any]:
    """The settings as plain data for the start-up log and run records; secrets masked."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    for name, value in settings:
        if isinstance(value, SecretStr):
            data[name] = "***"
    return data


def model_dir_problem(model_path: str | None, service: str) -> str | None:
    """Why ``model_path`` cannot be a model directory, or None. A path that does not look
    local (e.g. "Qwen/Qwen3-4B") is left to the hub, where the user pointed it."""
    if not model_path:
        return f"pope {service}: no model given (--model DIR); build a tiny one with: pope model init --out DIR"
    looks_local = model_path.startswith(("/", ".", "~")) or os.path.exists(model_path)
    if looks_local and not os.path.isfile(os.path.join(os.path.expanduser(model_path), "config.json")):
        return (
            f"pope {service}: no HF model directory at {model_path} (no config.json); "
            "build a tiny one with: pope model init --out DIR"
        )
    return None


def check_shared_keys(config_file: str | Path | None, models: list[type[SectionSettings]]) -> None:
    """A key in the ``shared`` section that no section has is a typo: every service would
    skip it silently, so it is an error here (checked by the CLI, which knows all sections)."""
    if not config_file:
        return
    path = Path(config_file)
    shared = read_config_file(path).get(SHARED, {})
    known = set().union(*(m.model_fields for m in models))
    unknown = sorted(k for k in shared if k not in known)
    if unknown:
        raise ConfigError(f"{path}, section 'shared': no section has the field(s) {', '.join(map(repr, unknown))}")
