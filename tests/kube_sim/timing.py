"""How fast the simulated cluster moves: per-transition delays and the controllers' stage timers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Speed:
    """Seconds each transition takes. `tick` is how often every controller re-reads the world."""

    tick: float = 0.01
    bind: float = 0.05  # PVC Pending -> Bound
    schedule: float = 0.05  # new pod -> PodScheduled (once its claims are Bound)
    create: float = 0.05  # ContainerCreating -> container running
    ready: float = 0.1  # container running -> Ready (Patroni bootstrap, basebackup)
    role: float = 0.05  # Ready -> Patroni writes the role label
    terminate: float = 0.05  # graceful shutdown, never longer than the grace period
    recreate: float = 0.05  # the StatefulSet controller noticing a missing member
    crash: float = 0.1  # period of crash-loop restarts and image-pull retries
    switchover: float = 0.1  # Patroni's switchover: the leader demotes, the candidate promotes
    restart: float = 0.1  # Patroni's POST /restart: PostgreSQL stops and starts again


FAST = Speed()
# Slow enough to watch a job's steps go by in a terminal, fast enough for a demo.
DEMO = Speed(
    tick=0.1,
    bind=2.0,
    schedule=1.0,
    create=3.0,
    ready=5.0,
    role=1.0,
    terminate=3.0,
    recreate=1.0,
    crash=3.0,
    switchover=3.0,
    restart=3.0,
)
SPEEDS = {"fast": FAST, "demo": DEMO}


class Timers:
    """When did each object enter its current stage? Level-triggered controllers derive the stage from the
    object and only need to remember since when they have seen it, keyed by uid (a recreated pod starts over)."""

    def __init__(self) -> None:
        self._since: dict[str, tuple[str, float]] = {}

    def elapsed(self, uid: str, stage: str, now: float) -> float:
        seen = self._since.get(uid)
        if seen is None or seen[0] != stage:
            self._since[uid] = (stage, now)
            return 0.0
        return now - seen[1]

    def forget(self, live: set[str]) -> None:
        for uid in set(self._since) - live:
            del self._since[uid]
