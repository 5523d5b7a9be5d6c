"""Logging: one line per event, each carrying the context it was written in (request id, job id, type, step,
attempt); human-readable, or one JSON object per line (`APIOPS_LOG_FORMAT=json`, the default in prod).

The context travels in a contextvar, so a line logged deep inside a step still names its job. The libraries the
service runs on (uvicorn, arq) are routed through the same handler, so a log collector sees one format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

from service.settings import Settings

_context: ContextVar[tuple[tuple[str, object], ...]] = ContextVar("apiops_log_context", default=())

LOGGERS = ("service", "jobs", "arq", "uvicorn", "uvicorn.error")


@contextmanager
def log_context(**values: object) -> Iterator[None]:
    """Add `key=value` pairs to every log line written inside the block (and in tasks started from it)."""
    token = _context.set(_context.get() + tuple(values.items()))
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.apiops_context = dict(_context.get())
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(context)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        pairs = " ".join(f"{key}={value}" for key, value in getattr(record, "apiops_context", {}).items())
        record.context = f" [{pairs}]" if pairs else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "apiops_context", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(settings: Settings) -> None:
    """Route the service's and its libraries' loggers to stderr in the configured format; idempotent."""
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if settings.effective_log_format == "json" else TextFormatter())
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(settings.log_level)
        logger.propagate = False
