"""Whether this worker reaches PostgreSQL, as its statements find it, and what it does while it cannot.

Every statement of the worker reports here (`failed`, `reached`). While PostgreSQL is unreachable the worker takes
no deliveries: `watch` pauses its intake, says so in its log at once and then every few seconds, and probes
PostgreSQL until it answers; its heartbeat (`GET /ops/workers`) and its `/metrics` show it meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

# While PostgreSQL is unreachable: how often the worker tries it, and how often it says so again.
PROBE_S = 1.0
SAY_EVERY_S = 5.0


class DatabaseHealth:
    """Reachable until a statement fails to reach PostgreSQL; reachable again once one does."""

    def __init__(self, on_change: Callable[[bool], None] | None = None) -> None:
        self.reachable = True
        self.down_since: float | None = None  # time.monotonic()
        self.last_error = ""
        self._on_change = on_change
        self._down = asyncio.Event()

    def failed(self, exc: BaseException) -> None:
        self.last_error = str(exc) or f"no answer ({type(exc).__name__})"
        if not self.reachable:
            return
        self.reachable = False
        self.down_since = time.monotonic()
        self._down.set()
        logger.warning("PostgreSQL unreachable: %s; this worker takes no jobs until it answers", self.last_error)
        if self._on_change is not None:
            self._on_change(False)

    def reached(self) -> None:
        if self.reachable:
            return
        down_s = time.monotonic() - (self.down_since or time.monotonic())
        self.reachable = True
        self.down_since = None
        self._down.clear()
        logger.warning("PostgreSQL reachable again after %.1fs; this worker takes jobs again", down_s)
        if self._on_change is not None:
            self._on_change(True)

    def status(self) -> dict[str, object]:
        """For the worker's heartbeat: `database` is `reachable` or `unreachable` (with since how long and why)."""
        if self.reachable:
            return {"database": "reachable", "accepting_jobs": True}
        down_s = round(time.monotonic() - (self.down_since or time.monotonic()), 1)
        return {
            "database": "unreachable",
            "accepting_jobs": False,
            "database_down_s": down_s,
            "database_error": self.last_error,
        }

    async def watch(self, probe: Callable[[], Awaitable[object]]) -> None:
        """Forever: while PostgreSQL is unreachable, `probe` it every PROBE_S (its outcome reports here) and say
        so every SAY_EVERY_S."""
        said_at = time.monotonic()
        while True:
            if self.reachable:
                await self._down.wait()
                said_at = time.monotonic()
            await asyncio.sleep(PROBE_S)
            try:
                await probe()
            except Exception:  # reported through failed(), by the statement itself
                pass
            if not self.reachable and time.monotonic() - said_at >= SAY_EVERY_S:
                said_at = time.monotonic()
                down_s = time.monotonic() - (self.down_since or said_at)
                logger.warning(
                    "PostgreSQL still unreachable after %.0fs: %s; this worker takes no jobs", down_s, self.last_error
                )
