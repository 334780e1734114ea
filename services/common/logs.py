"""Structured logging: one line per event, text for people or JSON for log shippers.

Every service calls ``setup_logging`` once, then ``log_resolved_config`` once, so the
first lines of every log say exactly what the process was configured with. uvicorn's own
loggers (its errors and one access line per request) go through the same handler
(``uvicorn_config`` passes ``log_config=None``, so uvicorn installs none of its own): with
``log_format: json`` every line a service writes is one JSON object.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

from services.common.config import SectionSettings, resolved

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is kept.
# uvicorn's color_message repeats msg with ANSI colours.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}


UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            # uvicorn's access line: '%s - "%s %s HTTP/%s" %d' % (client, method, path, version, status)
            out.update(zip(("client", "method", "path", "http_version", "status"), record.args, strict=True))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(service: str, level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in UVICORN_LOGGERS:  # undo a uvicorn dictConfig applied earlier in this process
        uvicorn_log = logging.getLogger(name)
        uvicorn_log.handlers.clear()
        uvicorn_log.propagate = True
    if fmt == "json":
        _transformers_through_ours()


def _transformers_through_ours() -> None:
    """transformers logs through a handler of its own and draws progress bars (loading
    weights) on stderr: for JSON lines its records go through ours and the bars are off."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # huggingface_hub's, and children's
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()


def log_resolved_config(settings: SectionSettings) -> None:
    logging.getLogger("pope.config").info(
        "resolved config [%s]: %s",
        settings.section,
        json.dumps(resolved(settings), sort_keys=True),
        extra={"config": resolved(settings)},
    )
