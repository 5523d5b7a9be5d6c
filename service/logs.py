"""Logging: one line per event, each carrying the context it was written in (request id, job id, type, step,
attempt); human-readable, or one JSON object per line (`APIOPS_LOG_FORMAT=json`, the default in prod).

The context travels in a contextvar, so a line logged deep inside a step still names its job; a task that outlives
the request or job that started it is started outside it (`detached`), so it never borrows that context.

Every line a process prints goes through one handler, in one format: the service's own, its libraries' (uvicorn's,
arq's, asyncio's), Python's warnings and an exception nothing caught. In the text format, control characters in a
message or a context value are escaped, so that no client can forge a log line (a `%0a` in a path, an ANSI escape).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import Context, ContextVar, copy_context
from datetime import UTC, datetime
from types import TracebackType

from service.settings import Settings

_context: ContextVar[tuple[tuple[str, object], ...]] = ContextVar("apiops_log_context", default=())

# Loggers at the configured level; anything else (a library's debug chatter) from WARNING up.
LOGGERS = ("apiops", "service", "jobs", "arq", "uvicorn")
_HANDLER_NAME = "apiops"


@contextmanager
def log_context(**values: object) -> Iterator[None]:
    """Add `key=value` pairs to every log line written inside the block (and in tasks started from it)."""
    token = _context.set(_context.get() + tuple(values.items()))
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**values: object) -> None:
    """Add `key=value` pairs to every later line of the current task (each asyncio task has a context of its own):
    for a hook that runs at the start of a task it does not wrap, as arq's `on_job_start`."""
    _context.set(_context.get() + tuple(values.items()))


def detached() -> Context:
    """The current context without its log context: for a task started inside a request or a job that serves
    others too (`asyncio.create_task(..., context=detached())`), whose lines must not name that request or job."""
    context = copy_context()
    context.run(_context.set, ())
    return context


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.apiops_context = dict(_context.get())
        return True


# C0 controls, DEL and C1 controls, each as a visible escape: one event stays one line, and no terminal obeys it.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def escape_controls(text: str) -> str:
    return text.translate(_CONTROLS)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(context)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        context = getattr(record, "apiops_context", {})
        pairs = " ".join(f"{key}={escape_controls(str(value))}" for key, value in context.items())
        record.context = f" [{pairs}]" if pairs else ""
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; json.dumps escapes every control character itself."""

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


class _ToHandler(logging.Filter):
    """On a library's own logger: hands each record to the service's handler, and stops it there.

    A filter, because the arq CLI configures logging itself (`logging.config.dictConfig`) right after it imports
    the worker's settings: that gives arq's loggers a plain handler of arq's own, and would print its start-up lines
    in arq's format, but it leaves the filters of arq's loggers alone."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__(_HANDLER_NAME)
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        self.handler.handle(record)
        return False


def configure_logging(settings: Settings) -> None:
    """Route every line of the process (the service's, its libraries', warnings, an uncaught exception) to stderr
    in the configured format; idempotent."""
    handler = logging.StreamHandler()
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if settings.effective_log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)  # beside any other (a test runner's capture), not instead
    root.setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
    for name in (*LOGGERS, "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
        logger.disabled = False
        if name in LOGGERS:
            logger.setLevel(settings.log_level)
    # The access line is the service's own (service.access, with its request id), however uvicorn was started.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    for name, arq_logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("arq.") and isinstance(arq_logger, logging.Logger):
            for old_filter in [f for f in arq_logger.filters if isinstance(f, _ToHandler)]:
                arq_logger.removeFilter(old_filter)
            arq_logger.addFilter(_ToHandler(handler))
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, traceback)
        return
    logging.getLogger("service").critical("uncaught exception: %s", error, exc_info=(kind, error, traceback))
