"""Worker heartbeats: each worker keeps a Redis key of its own alive (a TTL of three beats), so that a dead worker
disappears by itself, unlike arq's one shared health key, which any worker's clean shutdown deletes.
`GET /ops/workers` lists the live ones and what they run."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

logger = logging.getLogger(__name__)

KEY_PREFIX = "apiops:worker:"
BEAT_S = 5.0


def _key(queue_name: str, worker: str) -> str:
    return f"{KEY_PREFIX}{queue_name}:{worker}"


async def beat_forever(
    redis: Redis,
    queue_name: str,
    worker: str,
    running: Callable[[], list[str]],
    interval_s: float = BEAT_S,
    *,
    status: Callable[[], dict[str, object]] | None = None,
    on_beat: Callable[[Redis], Awaitable[object]] | None = None,
    beat_now: asyncio.Event | None = None,
) -> None:
    """Until cancelled; then the key is removed, so a worker that stopped cleanly is gone at once. `status`: more
    of what the beat says (whether the worker reaches PostgreSQL, and so takes jobs); `on_beat`: run with each
    beat (the worker's reading of Redis' clock); `beat_now`, when set, brings the next beat forward (the status
    changed)."""
    started = datetime.now(UTC).isoformat()
    key = _key(queue_name, worker)
    try:
        while True:
            beat = {
                "worker": worker,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "queue": queue_name,
                "started_at": started,
                "seen_at": datetime.now(UTC).isoformat(),
                "running": running(),
                **(status() if status is not None else {}),
            }
            try:
                async with asyncio.timeout(interval_s):
                    await redis.set(key, json.dumps(beat), px=int(interval_s * 3000))
                    if on_beat is not None:
                        await on_beat(redis)
            except Exception as exc:  # Redis down: the worker goes on; it shows as gone meanwhile
                logger.warning("heartbeat not written: %s", exc)
            if beat_now is None:
                await asyncio.sleep(interval_s)
                continue
            try:
                async with asyncio.timeout(interval_s):
                    await beat_now.wait()
            except TimeoutError:
                pass
            beat_now.clear()
    finally:
        try:
            async with asyncio.timeout(1):
                await redis.delete(key)
        except Exception as exc:
            logger.info("heartbeat key left to expire: %s", exc)


async def live_workers(redis: Redis, queue_name: str) -> list[dict[str, Any]]:
    keys = [key async for key in redis.scan_iter(match=f"{KEY_PREFIX}{queue_name}:*", count=500)]
    if not keys:
        return []
    beats = [json.loads(raw) for raw in await redis.mget(keys) if raw is not None]
    return sorted(beats, key=lambda beat: str(beat["worker"]))
