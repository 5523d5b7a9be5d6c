"""`apiops run` as an operator starts it: uvicorn and the arq CLI (`arq jobs.worker.WorkerSettings`) as real
processes, reached over real HTTP, stopped with Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx

from service.settings import Settings
from tests.conftest import KEYS, free_port, key_entries, wait_for, wait_for_status

APIOPS = str(Path(sys.executable).with_name("apiops"))


async def test_apiops_run_serves_and_works_until_ctrl_c(settings: Settings) -> None:
    port = free_port()
    env = {
        **os.environ,
        "APIOPS_DATABASE_URL": settings.database_url.get_secret_value(),
        "APIOPS_REDIS_URL": settings.redis_url.get_secret_value(),
        "APIOPS_QUEUE_NAME": settings.queue_name,
        "APIOPS_API_KEYS": "[" + ",".join(k.model_dump_json() for k in key_entries()) + "]",
        "APIOPS_PORT": str(port),
    }
    process = await asyncio.create_subprocess_exec(
        APIOPS, "run", env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": KEYS["writer"][0]}
        ) as api:

            async def ready() -> bool:
                try:
                    return (await api.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, within=15, interval=0.1)

            async def workers() -> Any:
                return (await api.get("/ops/workers")).json()["workers"]

            await wait_for(workers, within=15, interval=0.1)  # its heartbeat: the worker has started
            job_id = (await api.post("/ops/jobs/noop", json={"steps": 3})).json()["job_id"]
            job = await wait_for_status(api, job_id, "success", "failed", within=2)

        assert job["status"] == "success"
        assert [s["status"] for s in job["steps"]] == ["success"] * 3
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()[-2000:]
    log = stderr.decode()
    assert "claimed job" in log and "SIGTERM: taking no more jobs" in log
