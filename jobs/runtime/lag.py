"""A blocked event loop, seen and said. A worker runs every job on one event loop, so a step that blocks it (a
synchronous sleep, a CPU-bound loop) stops every lease renewal of the worker: past the bound in
docs/architecture.md its jobs are taken over. Two things watch for it:

- `watch_loop_lag`, a task beside the jobs, measures how late the loop wakes it, all the time, and counts every
  block in the worker's metrics;
- `timed`, around each step, measures each stretch the step runs without yielding, so that the log names the step
  that blocked (its job, step and attempt are in the line's context) and for how long.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

from jobs.runtime.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How often the monitor looks at the loop, and the lag (or the stretch of a step without a yield) said as a block.
TICK_S = 0.1
BLOCKED_S = 0.5


async def watch_loop_lag(metrics: WorkerMetrics, running: Callable[[], list[str]]) -> None:
    """Forever: wake every TICK_S; a wake-up BLOCKED_S late or more is a block, counted and said with the jobs
    that were running."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(TICK_S)
        lag = loop.time() - before - TICK_S
        if lag >= BLOCKED_S:
            metrics.blocked(lag)
            logger.warning("event loop blocked for %.1fs; jobs running: %s", lag, ", ".join(running()) or "none")


def timed(
    coro: Coroutine[Any, Any, T], step: str, on_block: Callable[[str, float], None] | None = None
) -> Coroutine[Any, Any, T]:
    """`coro`, run as it is, saying each stretch of BLOCKED_S or more it runs without yielding to the loop (and
    telling `on_block(step, seconds)`)."""

    @types.coroutine
    def run() -> Generator[Any, Any, T]:
        inner = coro.__await__()
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            started = time.perf_counter()
            try:
                yielded = inner.throw(thrown) if thrown is not None else inner.send(sent)
            except StopIteration as stop:
                result: T = stop.value
                return result
            finally:
                took = time.perf_counter() - started
                if took >= BLOCKED_S:
                    logger.warning("step %s blocked the event loop for %.1fs", step, took)
                    if on_block is not None:
                        on_block(step, took)
            sent, thrown = None, None
            try:
                sent = yield yielded
            except BaseException as exc:  # handed on to the step as it would have reached it
                thrown = exc

    return run()
