"""Every setting of a section as a command-line flag, and the configuration reference.

Both are generated from the settings models (services/*/settings.py, their field
docstrings), so nothing is listed twice: ``add_setting_flags`` gives a parser one option
per setting (``--field-name``; nested ``--streams.lease-ms``), ``settings_from_args`` loads
the section with the options given, and ``render_docs`` writes docs/configuration.md
(``pope config docs``).

A flag's value is a string, validated like an environment variable's: numbers as written,
``true``/``false`` for switches (the switch alone means true), ``null`` for none where a
setting takes None, JSON for mappings and lists (``--variant-weights '{"hinted": 1.0}'``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, NamedTuple, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from services.common.config import (
    ConfigError,
    SectionSettings,
    Setting,
    flag_name,
    load_settings_with_flags,
    setting_fields,
)

S = TypeVar("S", bound=SectionSettings)

NULL = "null"
DEST = "setting:"  # argparse dest of a setting's option: "setting:streams.lease_ms"

VALUES = (
    "Values: numbers and words as written; true/false for switches (a switch alone means true); "
    "null for none where a setting allows it; JSON for mappings and lists. Precedence: flag > "
    "env POPE_{S}__<FIELD>[__<SUB>]{redis} > the --config file's '{s}' section > "
    "its 'shared' section > default. Reference: docs/configuration.md."
)


class _Given(NamedTuple):
    raw: str
    option: str


class _SettingAction(argparse.Action):
    """Stores the raw value with the option it came by (``--model`` or ``--model-path``)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, _Given(str(values), option_string or self.option_strings[0]))


def env_name(model: type[SectionSettings], setting: Setting) -> str:
    prefix = str(model.model_config.get("env_prefix", ""))
    return prefix + "__".join(setting.path).upper()


def shown(value: Any) -> str:
    """A default as one types it (JSON but bare strings), the same on every machine."""
    data = to_jsonable_python(value)
    text = data if isinstance(data, str) else json.dumps(data)
    for root, name in ((os.getcwd(), "."), (str(Path.home()), "~")):
        if len(root) > 1:
            text = text.replace(root, name)
    return text


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "None"
    if get_origin(annotation) is Literal:
        return " | ".join(json.dumps(v) for v in get_args(annotation))
    args, origin = get_args(annotation), get_origin(annotation)
    if origin in (Union, UnionType):
        return " | ".join(map(_type_name, args))
    if args and isinstance(origin, type):
        return f"{origin.__name__}[{', '.join(map(_type_name, args))}]"
    return getattr(annotation, "__name__", str(annotation))


def _metavar(setting: Setting) -> str:
    if setting.is_bool:
        return "{true,false}"
    if setting.is_json:
        return "JSON"
    (first, *_) = setting.types
    if get_origin(first) is Literal:
        return "{" + ",".join(str(v) for v in get_args(first)) + "}"
    return "TEXT" if first in (str, SecretStr) else first.__name__.upper()


def terminal_doc(info: FieldInfo) -> str:
    """A field's docstring on one line, its ``literals`` plain, as help text shows it."""
    return " ".join((info.description or "").replace("``", "").split())


def add_field_flag(parser: argparse.ArgumentParser, model: type[BaseModel], name: str, **kwargs: Any) -> None:
    """``--name`` for one field of ``model`` (a job's settings, such as ``rollout.hints``),
    its help the field's docstring and default, read from the model, never written twice."""
    field = model.model_fields[name]
    help = f"{terminal_doc(field)} (default {field.default})".replace("%", "%%")
    parser.add_argument(f"--{name.replace('_', '-')}", help=help, **kwargs)


def _help(model: type[SectionSettings], setting: Setting) -> str:
    env = env_name(model, setting)
    doc = terminal_doc(setting.info)
    if setting.secret:
        return f"{doc} Secret, never shown; prefer env {env} (flags are visible in ps)."
    extra = ["alone: true"] if setting.is_bool else []
    extra += ["null: none"] if setting.optional else []
    if setting.default is not PydanticUndefined:
        extra.append(f"default: {shown(setting.default)}")
    extra.append(f"env {env}")
    return f"{doc} ({'; '.join(extra)})".replace("%", "%%")


def add_setting_flags(
    parser: argparse.ArgumentParser, model: type[SectionSettings], aliases: Mapping[str, Sequence[str]] | None = None
) -> None:
    """One option per setting of ``model`` (nested ones in a group each), plus ``aliases``
    (setting dotted name -> extra option strings, e.g. {"model_path": ["--model"]})."""
    aliases = aliases or {}
    redis = " > REDIS_URL (redis_url)" if "redis_url" in model.model_fields else ""
    parser.epilog = VALUES.format(S=model.section.upper(), s=model.section, redis=redis)
    groups: dict[tuple[str, ...], argparse._ActionsContainer] = {(): parser}
    for setting in setting_fields(model):
        if setting.nested:
            title = f"{setting.dotted} (env {env_name(model, setting)}__*)"
            groups[setting.path] = parser.add_argument_group(title, setting.doc.replace("%", "%%"))
            continue
        groups[setting.path[:-1]].add_argument(
            flag_name(setting.path),
            *aliases.get(setting.dotted, ()),
            action=_SettingAction,
            dest=DEST + setting.dotted,
            default=None,
            metavar=_metavar(setting),
            help=_help(model, setting),
            nargs="?" if setting.is_bool else None,  # a switch alone is true
            const="true" if setting.is_bool else None,
        )


def settings_from_args(model: type[S], args: argparse.Namespace) -> S:
    """``model`` loaded with the setting options given in ``args`` (and ``args.config``)."""
    by_name = {s.dotted: s for s in setting_fields(model)}
    flags: dict[str, Any] = {}
    names: dict[tuple[str, ...], str] = {}
    for dest, given in sorted(vars(args).items()):
        if not dest.startswith(DEST) or given is None:
            continue
        setting = by_name[dest[len(DEST) :]]
        node = flags
        for part in setting.path[:-1]:
            node = node.setdefault(part, {})
        node[setting.path[-1]] = _value(model, setting, given)
        names[setting.path] = given.option
    return load_settings_with_flags(model, getattr(args, "config", None), flags, names)


def _value(model: type[SectionSettings], setting: Setting, given: _Given) -> Any:
    if setting.optional and given.raw == NULL:
        return None
    if not setting.is_json:
        return given.raw  # validated by pydantic, as an environment variable's value is
    try:
        return json.loads(given.raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"invalid configuration for section {model.section!r}:\n  {model.section}.{setting.dotted}: "
            f"not valid JSON ({exc.msg}) (got {given.raw!r}) [from command-line option {given.option}]"
        ) from None


def render_docs(models: Sequence[type[SectionSettings]], aliases: Mapping[str, Sequence[str]]) -> str:
    """docs/configuration.md: every setting of every section, from the models (``aliases``:
    setting -> its other option strings, as given to ``add_setting_flags``)."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from the settings models (services/*/settings.py) by `pope config docs`;",
        "     do not edit: change a field's docstring and run `make config-docs`. -->",
        "",
        "Each service reads its own section of one YAML file (`--config FILE`), the environment",
        "and its command-line flags. Precedence, highest first:",
        "",
        "1. the command-line flag: `pope trainer --learning-rate 3e-6`, nested `--streams.lease-ms 30000`",
        "2. the environment: `POPE_<SECTION>__<FIELD>`, nested `POPE_TRAINER__STREAMS__LEASE_MS=30000`",
        "3. `REDIS_URL`, for `redis_url` only",
        "4. the file's section (`trainer:`), then its `shared:` section",
        "5. the default",
        "",
        "Flag and environment values are strings, validated as the file's values are: numbers as",
        "written, `true`/`false` for switches (a switch flag alone means `true`), `null` (flags) for",
        "none where a setting allows it, JSON for mappings and lists",
        "(`--variant-weights '{\"hinted\": 1.0}'`). A bad value stops the service with a message",
        "naming the file and field, the variable or the flag it came from. Secrets are never",
        "printed (`pope config show`, the start-up log, `--help`); pass them by environment, not",
        "by flag, which other users can see in `ps`. `pope config show SECTION [--config FILE]",
        "[flags]` prints a section as resolved.",
        "",
        "## The `shared` section",
        "",
        "A key under `shared:` is a default for every section that has that field; a section's",
        "own value wins, nested sections (`streams:`) merge key by key. A key no section has is",
        "an error. Fields of more than one section:",
        "",
    ]
    owners: dict[str, list[str]] = {}
    for model in models:
        for name in model.model_fields:
            owners.setdefault(name, []).append(model.section)
    out += [f"- `{name}`: {', '.join(secs)}" for name, secs in owners.items() if len(secs) > 1]
    for model in models:
        section = model.section
        out += ["", f"## `{section}` (`pope {section}`)", ""]
        doc = " ".join((model.__doc__ or "").split()) if "__doc__" in vars(model) else ""
        out += [doc, ""] if doc else []
        out += [
            f"File section `{section}:`, environment `POPE_{section.upper()}__<FIELD>`, flag `--<field>`",
            "(underscores as dashes).",
        ]
        settings = setting_fields(model)
        for group in [None, *(s for s in settings if s.nested)]:  # top-level first, then each nested section
            if group is not None:
                env = env_name(model, group)
                where = f"In the file a mapping `{group.dotted}:` under `{section}:`; environment `{env}__<SUB>`;"
                out += ["", f"### `{section}.{group.dotted}`", "", group.doc, "", where]
                out += [f"flags `{flag_name(group.path)}.<sub>`."]
            for setting in settings:
                if not setting.nested and setting.path[:-1] == (group.path if group else ()):
                    out += _doc_entry(model, setting, aliases)
    return "\n".join(out) + "\n"


def _doc_entry(model: type[SectionSettings], setting: Setting, aliases: Mapping[str, Sequence[str]]) -> list[str]:
    names = ", ".join(f"`{n}`" for n in (flag_name(setting.path), *aliases.get(setting.dotted, ())))
    default = "unset" if setting.secret and not setting.default else f"`{shown(setting.default)}`"
    kind = _type_name(setting.info.annotation).replace("|", "\\|")
    return [
        "",
        f"- **`{setting.dotted}`**: {setting.doc}" + (" Secret." if setting.secret else ""),
        f"  Type {kind}, default {default}; flag {names}; env `{env_name(model, setting)}`.",
    ]
