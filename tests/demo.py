"""`make demo`: rebuild replica pg-1 of a simulated PostgreSQL cluster through the real service, live;
`make demo JOB=switchover`: move its leader to pg-1 through Patroni instead; `JOB=restart`: restart every member,
the primary last; `JOB=reinit`: re-clone replica pg-1 in place; `JOB=cnpg-rebuild`, `JOB=cnpg-switchover` and
`JOB=cnpg-restart`: on a CloudNativePG Cluster, rebuild pg-2 (it comes back as a new instance), promote it, or have
the operator restart every instance, the primary last and in place (the Cluster's primaryUpdateMethod: restart).

Starts the simulated Kubernetes cluster (demo speed) as its own process, then `apiops run` (API and a worker)
on a database (`apiops_demo`, recreated each time) and a queue of its own, so the user's `apiops` data is never
touched. Submits the job (a pg-rebuild of db/pg/pg-1, a pg-switchover of db/pg to pg-1, a pg-restart of db/pg, a
pg-reinit of db/pg/pg-1) over HTTP with the development key; an approval policy covers the
demo's namespace, so the job waits until a second key (`oncall-2`) approves it, after the requester's own approval
is refused. Prints every change of a step's status or detail as it happens, prints the final job as JSON, stops
everything and exits 0 on success. The simulated cluster enforces the worker's shipped Role (deploy/).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from service.db import asyncpg_dsn
from service.settings import DEV_API_KEY, get_settings, hash_key

DEMO_DATABASE = "apiops_demo"
DEMO_QUEUE = "apiops-demo:queue"
RBAC = Path(__file__).resolve().parents[1] / "deploy" / "worker-rbac.yaml"
JOB_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def wait_http(url: str, within: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with status {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {within:g}s")


async def recreate_database(url: str) -> None:
    """A fresh demo database each run: no job of an earlier demo can hold the cluster's target."""
    admin = await asyncpg.connect(asyncpg_dsn(url, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
    finally:
        await admin.close()


# The demo's namespace is production here: a real rebuild or switchover needs a second person's approval.
POLICIES = [
    {"job_type": job_type, "targets": ["k8s/default/db/*"], "approvals": 1, "expires_s": 600}
    for job_type in ("pg-rebuild", "pg-switchover", "pg-restart", "pg-reinit")
]
# What `make demo JOB=...` runs: the job type and its params.
JOBS: dict[str, tuple[str, dict[str, Any]]] = {
    "rebuild": ("pg-rebuild", {"namespace": "db", "cluster": "pg", "pod": "pg-1"}),
    "switchover": ("pg-switchover", {"namespace": "db", "cluster": "pg", "candidate": "pg-1"}),
    "restart": ("pg-restart", {"namespace": "db", "cluster": "pg"}),
    "reinit": ("pg-reinit", {"namespace": "db", "cluster": "pg", "pod": "pg-1"}),
    "cnpg-rebuild": ("pg-rebuild", {"namespace": "db", "cluster": "pg", "pod": "pg-2", "profile": "cnpg"}),
    "cnpg-switchover": ("pg-switchover", {"namespace": "db", "cluster": "pg", "candidate": "pg-2", "profile": "cnpg"}),
    "cnpg-restart": ("pg-restart", {"namespace": "db", "cluster": "pg", "method": "in-place", "profile": "cnpg"}),
}


def demo_env(kubeconfig: Path, api_port: int, approver_key: str) -> tuple[dict[str, str], str]:
    base = get_settings()
    database_url = (
        make_url(base.database_url.get_secret_value()).set(database=DEMO_DATABASE).render_as_string(hide_password=False)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIOPS_")}
    env |= {
        "APIOPS_ENV": "dev",
        "APIOPS_DATABASE_URL": database_url,
        "APIOPS_REDIS_URL": base.redis_url.get_secret_value(),
        "APIOPS_QUEUE_NAME": DEMO_QUEUE,
        "APIOPS_HOST": "127.0.0.1",
        "APIOPS_PORT": str(api_port),
        "APIOPS_LOG_LEVEL": "WARNING",
        "APIOPS_KUBECONFIG": str(kubeconfig),
        "APIOPS_PG_REBUILD_POLL_INTERVAL_S": "0.5",
        "APIOPS_APPROVAL_POLICIES": json.dumps(POLICIES),
        # The second person: a key of the same (default) team that may approve.
        "APIOPS_API_KEYS": json.dumps(
            [{"name": "oncall-2", "sha256": hash_key(approver_key), "scopes": ["jobs:read", "jobs:approve"]}]
        ),
    }
    return env, database_url


def follow(api: httpx.Client, job_id: str) -> dict[str, Any]:
    """Print each step's status and detail whenever either changes; return the finished job."""
    started = time.monotonic()
    seen: dict[str, tuple[str, str | None]] = {}
    deadline = started + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job: dict[str, Any] = api.get(f"/ops/jobs/{job_id}").json()
        for step in job["steps"]:
            now = (step["status"], step["detail"])
            if seen.get(step["name"]) != now:
                seen[step["name"]] = now
                if step["status"] != "pending":
                    elapsed = time.monotonic() - started
                    print(f"{elapsed:6.1f}s  {step['name']:<21} {step['status']:<9} {step['detail'] or ''}", flush=True)
        if job["status"] in ("success", "failed", "cancelled", "rejected"):
            return job
        time.sleep(0.25)
    raise RuntimeError(f"job {job_id} did not finish within {JOB_TIMEOUT_S:g}s")


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            # `apiops run` stops its API and worker on SIGINT, as on Ctrl-C.
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    choice = (argv if argv is not None else sys.argv[1:])[:1] or ["rebuild"]
    if choice[0] not in JOBS:
        say(f"unknown demo {choice[0]!r}; the demos are: {', '.join(JOBS)}")
        return 2
    job_type, params = JOBS[choice[0]]
    workdir = Path(tempfile.mkdtemp(prefix="apiops-demo-"))
    kubeconfig = workdir / "kubeconfig"
    sim_port, api_port = free_port(), free_port()
    approver_key = f"apiops_{secrets.token_urlsafe(32)}"
    env, database_url = demo_env(kubeconfig, api_port, approver_key)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        say(f"starting the simulated Kubernetes cluster on 127.0.0.1:{sim_port} (kubeconfig {kubeconfig})")
        sim = subprocess.Popen(
            [sys.executable, "-m", "tests.kube_sim", "--port", str(sim_port), "--kubeconfig", str(kubeconfig)]
            + ["--speed", "demo", "--log-level", "WARNING", "--rbac", str(RBAC)]
            + ["--profile", params.get("profile", "zalando")]
        )
        processes.append(sim)
        wait_http(f"http://127.0.0.1:{sim_port}/version", 15, sim)
        say(f"preparing database {make_url(database_url).database}")
        asyncio.run(recreate_database(database_url))
        subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, check=True)
        say(f"starting the API on 127.0.0.1:{api_port} and a worker")
        service = subprocess.Popen([sys.executable, "-m", "service.cli", "run"], env=env)
        processes.insert(0, service)
        wait_http(f"http://127.0.0.1:{api_port}/readyz", 30, service)

        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"X-API-Key": DEV_API_KEY}) as api:
            say(f"POST /ops/jobs/{job_type} {json.dumps(params)}")
            created = api.post(f"/ops/jobs/{job_type}", json=params)
            if created.status_code != 202:
                say(f"submission refused: {created.status_code} {created.text}")
                return 1
            job_id = created.json()["job_id"]
            policy = next(p for p in POLICIES if p["job_type"] == job_type)
            say(f"{job_id} is {created.json()['status']}: policy {json.dumps(policy)}")
            own = api.post(f"/ops/jobs/{job_id}/approve", json={})
            say(f"the requester's own approval: {own.status_code} {own.json()['error']['message']}")
            approved = api.post(
                f"/ops/jobs/{job_id}/approve", json={"reason": "demo"}, headers={"X-API-Key": approver_key}
            )
            say(f"approved by oncall-2: {approved.status_code}, now {approved.json()['status']}")
            job = follow(api, job_id)
        print(json.dumps(job, indent=2))
        say(f"job {job['job_id']} finished: {job['status']}")
        return 0 if job["status"] == "success" else 1
    except (RuntimeError, subprocess.CalledProcessError, OSError, asyncpg.PostgresError, httpx.HTTPError) as exc:
        say(f"failed: {exc}")
        return 1
    finally:
        say("stopping")
        stop(processes)
        shutil.rmtree(workdir, ignore_errors=True)  # the kubeconfig: a demo leaves nothing behind


if __name__ == "__main__":
    sys.exit(main())
