"""A wall clock that is wrong, for the process of a test: Python imports this module at start-up when this folder is
on PYTHONPATH (`tests.processes.job_worker(..., clock_skew_s=...)` puts it there), and from then on `time.time()` and
`time.time_ns()` run APIOPS_TEST_CLOCK_SKEW_S seconds off. The monotonic clock is left alone, as a stepped or
drifting wall clock leaves it."""

from __future__ import annotations

import os
import time

_SKEW_S = float(os.environ.get("APIOPS_TEST_CLOCK_SKEW_S", "0"))
_time, _time_ns = time.time, time.time_ns


def _skewed() -> float:
    return _time() + _SKEW_S


def _skewed_ns() -> int:
    return _time_ns() + int(_SKEW_S * 1e9)


time.time = _skewed
time.time_ns = _skewed_ns
