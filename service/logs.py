"""Logging: one line per event, each carrying the context it was written in (request id, job id, step, attempt).

The context travels in a contextvar, so a line logged deep inside a step still names its job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from service.settings import Settings

_context: ContextVar[tuple[tuple[str, object], ...]] = ContextVar("apiops_log_context", default=())


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
        pairs = " ".join(f"{key}={value}" for key, value in _context.get())
        record.context = f" [{pairs}]" if pairs else ""
        return True


def configure_logging(settings: Settings) -> None:
    """Route the project's loggers to stderr at the configured level; idempotent."""
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s%(context)s: %(message)s"))
    for name in ("service", "jobs"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(settings.log_level)
        logger.propagate = False
