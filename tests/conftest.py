"""Shared fixtures: a fresh PostgreSQL database per test (cloned from a migrated template), a dedicated Redis db
index flushed per test, the real ASGI app with its lifespan, and a real arq worker on a per-test queue.

Environment: APIOPS_TEST_PG_ADMIN_URL (a database to connect to for CREATE/DROP DATABASE) and
APIOPS_TEST_REDIS_URL (must name a db index that nothing else uses; it is flushed).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg
import httpx
import hypothesis
import pytest
import uvicorn
from alembic.config import Config
from arq.worker import Worker, create_worker
from redis.asyncio import Redis
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.types import ASGIApp, Receive, Scope, Send

from alembic import command
from jobs import noop, pg_rebuild, pg_reinit, pg_restart, pg_switchover
from jobs.pg_rebuild import PgRebuildSettings
from jobs.pgkube.params import PgSettings
from jobs.worker import WorkerSettings
from service.api.app import create_app
from service.db import asyncpg_dsn
from service.jobtypes import Registry
from service.queue import redis_settings
from service.settings import ApiKeyEntry, Settings, hash_key
from service.settings import Scope as KeyScope
from tests import testjobs
from tests.kube_sim import KubeSim
from tests.kube_sim.rbac import Rbac

ADMIN_URL = os.environ.get("APIOPS_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("APIOPS_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
ALEMBIC_INI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "alembic.ini")


class KeyGiven(NamedTuple):
    key: str
    scopes: frozenset[KeyScope]
    team: str = "default"
    targets: tuple[str, ...] | None = None


# name -> key; every test app accepts these. Those without a team are the `default` team's, as unconfigured keys are.
KEYS: dict[str, KeyGiven] = {
    "reader": KeyGiven("reader-key", frozenset({KeyScope.READ})),
    "writer": KeyGiven("writer-key", frozenset({KeyScope.READ, KeyScope.WRITE})),
    "admin": KeyGiven("admin-key", frozenset({KeyScope.ADMIN})),
    # Another team, with a writer whose name is also one of the default team's keys.
    "blue-writer": KeyGiven("blue-writer-key", frozenset({KeyScope.READ, KeyScope.WRITE}), team="blue"),
    "blue-admin": KeyGiven("blue-admin-key", frozenset({KeyScope.ADMIN}), team="blue"),
    "blue-staging": KeyGiven(
        "blue-staging-key", frozenset({KeyScope.READ, KeyScope.WRITE}), team="blue", targets=("noop/staging/*",)
    ),
    # Approvers of the default team (jobs:admin may approve too).
    "approver": KeyGiven("approver-key", frozenset({KeyScope.READ, KeyScope.APPROVE})),
    "approver2": KeyGiven("approver2-key", frozenset({KeyScope.READ, KeyScope.APPROVE})),
    # The service's operators: every team.
    "operator": KeyGiven("operator-key", frozenset({KeyScope.SERVICE_ADMIN}), team="ops"),
}
# The actor a key's jobs are recorded with, where it is not the key's own name.
ACTORS = {"blue-writer": "writer"}

TEST_REGISTRY = Registry(
    [noop.JOB, pg_rebuild.JOB, pg_switchover.JOB, pg_restart.JOB, pg_reinit.JOB, *testjobs.JOB_TYPES]
)

# Fuzzing (tests/test_fuzz.py): the same examples on every run (derandomized, no database of earlier ones), so that
# CI is reproducible and a failure there fails the same way locally; no deadline, as the machine may be busy. The
# `explore` profile (`pytest --hypothesis-profile=explore`) tries new examples, three times as many.
hypothesis.settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    # The app and its database are set up once per test and shared by its examples, on purpose.
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture, hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.register_profile(
    "explore",
    hypothesis.settings.get_profile("ci"),
    derandomize=False,
    max_examples=300,
)
hypothesis.settings.load_profile("ci")

# The job author's test kit (the `job_kit` fixture): docs/job-development.md, "Testing a job type".
pytest_plugins = ["tests.kit"]

# Importing jobs.worker installs uvloop's policy, for the loop arq creates in a worker process (the tests that
# start `arq jobs.worker.WorkerSettings` as a process run on it). The tests' own loops stay asyncio's: under
# uvloop, a daemon started by a subprocess (tmux's server) keeps the subprocess's pipes open.
asyncio.set_event_loop_policy(None)


def key_entries() -> tuple[ApiKeyEntry, ...]:
    return tuple(
        ApiKeyEntry(
            name=ACTORS.get(name, name), sha256=hash_key(k.key), scopes=k.scopes, team=k.team, targets=k.targets
        )
        for name, k in KEYS.items()
    )


def headers(who: str = "writer") -> dict[str, str]:
    return {"X-API-Key": KEYS[who][0]}


async def _admin() -> asyncpg.Connection:
    return await asyncpg.connect(asyncpg_dsn(ADMIN_URL), timeout=5)


def _db_url(name: str) -> str:
    return make_url(ADMIN_URL).set(drivername="postgresql+asyncpg", database=name).render_as_string(False)


async def migrate(engine: AsyncEngine, revision: str = "head", downgrade: bool = False) -> None:
    """Run alembic on a connection of `engine` (the env shares it instead of making its own)."""
    config = Config(ALEMBIC_INI)
    config.attributes["configure_logging"] = False

    def run(connection: Any) -> None:
        config.attributes["connection"] = connection
        (command.downgrade if downgrade else command.upgrade)(config, revision)

    async with engine.begin() as conn:
        await conn.run_sync(run)


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    """A database migrated to head once per session, dropped at its end; each test clones it (CREATE DATABASE ...
    TEMPLATE)."""
    name = f"apiops_test_tpl_{os.getpid()}"

    async def build() -> None:
        admin = await _admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        engine = create_async_engine(_db_url(name))
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    async def drop() -> None:
        admin = await _admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(build())
        yield name
        loop.run_until_complete(drop())
    finally:
        loop.close()


@pytest.fixture
async def database_url(template_db: str) -> AsyncIterator[str]:
    name = f"apiops_test_{os.getpid()}_{secrets.token_hex(4)}"
    admin = await _admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await admin.close()
    yield _db_url(name)
    admin = await _admin()
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


@pytest.fixture
def settings(database_url: str, redis: Redis) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=REDIS_URL,
        api_keys=key_entries(),
        queue_name=f"apiops-test:{secrets.token_hex(4)}",
        lease_ttl_s=2,
        db_pool_size=5,
    )


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test's database, for asserting on rows."""
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url.get_secret_value()))
    yield conn
    await conn.close()


class _WithState:
    """Hands the lifespan's state to each request, as an ASGI server does (httpx's transport runs no lifespan)."""

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app({**scope, "state": dict(self.state)}, receive, send)


@asynccontextmanager
async def api_client(
    settings: Settings, registry: Registry = TEST_REGISTRY, **client_args: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The app, with its lifespan, behind an httpx client; `registry` (with its job types' settings) as given."""
    app = create_app(settings, registry)
    async with app.router.lifespan_context(app) as state:
        transport = httpx.ASGITransport(app=_WithState(app, dict(state or {})), client=("10.1.2.3", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://apiops.test", **client_args) as client:
            yield client


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings, headers=headers("writer")) as c:
        yield c


def make_worker(settings: Settings, registry: Registry = TEST_REGISTRY, **overrides: Any) -> Worker:
    """A real arq worker, configured like `arq jobs.worker.WorkerSettings`, on the test's queue and database, with
    `registry`'s job types and their settings."""
    return create_worker(
        dict(vars(WorkerSettings)),
        redis_settings=redis_settings(settings),
        queue_name=settings.queue_name,
        ctx={"settings": settings, "registry": registry, "handle_signals": False},
        handle_signals=False,
        poll_delay=0.01,
        **overrides,
    )


@asynccontextmanager
async def running_worker(
    settings: Settings, registry: Registry = TEST_REGISTRY, **overrides: Any
) -> AsyncIterator[Worker]:
    """A test worker polling the queue in the background until the block ends (then stopped as on SIGTERM)."""
    worker = make_worker(settings, registry, **overrides)
    task = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        # As on SIGTERM: running jobs are cancelled (and hand their leases back), polling stops. Not
        # `worker.close()`: it cancels a second time and its gather raises if a job ends cancelled, which
        # would skip on_shutdown.
        # A job that has just finished is still being recorded by arq: let that end before cancelling anything.
        worker.allow_pick_jobs = False
        unfinished = [t for t in worker.tasks.values() if not t.done()]
        if unfinished:
            await asyncio.wait(unfinished, timeout=0.3)
        worker.handle_sig(signal.SIGTERM)
        await asyncio.gather(task, *worker.tasks.values(), return_exceptions=True)
        # arq records a finished job in Redis inside asyncio.shield: cancelling the job's task does not stop that
        # write, which would otherwise outlive the test and leak its Redis pipeline.
        recording = {t for t in asyncio.all_tasks() if t.get_coro().__qualname__.startswith("Worker.finish")}  # type: ignore[union-attr]
        if recording:
            await asyncio.wait(recording, timeout=5)
        if worker.on_shutdown is not None:
            await worker.on_shutdown(worker.ctx)
        await worker.pool.aclose(close_connection_pool=True)


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[Worker]:
    async with running_worker(settings) as w:
        yield w


async def run_burst(settings: Settings, within: float = 10.0, **overrides: Any) -> Worker:
    """A test worker in arq's burst mode: it runs every delivery on the queue, and those that its jobs put back,
    then returns once the queue is empty and its jobs are over: every job queued before is then finished or
    waiting for a delivery that is not due yet."""
    worker = make_worker(settings, burst=True, **overrides)
    try:
        async with asyncio.timeout(within):
            await worker.main()
    finally:
        # Only when `within` ran out are jobs still running: end them so that none outlives the test.
        for task in worker.tasks.values():
            task.cancel()
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        if worker.on_shutdown is not None:
            await worker.on_shutdown(worker.ctx)
        await worker.pool.aclose(close_connection_pool=True)
    return worker


_NOTHING = object()


async def wait_for(
    probe: Callable[[], Awaitable[Any]],
    within: float = 5.0,
    interval: float = 0.02,
    *,
    until: Callable[[Any], object] = bool,
    show: Callable[[Any], str] = repr,
) -> Any:
    """Poll `probe` until `until` holds for what it returns (by default: until that is truthy) and return it; fail
    with the last value seen (rendered by `show`) if that takes longer than `within` seconds."""
    last: Any = _NOTHING
    deadline = asyncio.timeout(within)
    try:
        async with deadline:
            while True:
                last = await probe()
                if until(last):
                    return last
                await asyncio.sleep(interval)
    except TimeoutError:
        if not deadline.expired():
            raise  # the probe's own timeout, not ours
        seen = "nothing, the probe never returned" if last is _NOTHING else show(last)
        raise AssertionError(f"not true within {within}s; last seen: {seen}") from None


def job_summary(job: Any) -> str:
    """A job as read from the API, in one line: its status, attempt, error and each step's status and detail."""
    if not isinstance(job, dict) or "status" not in job:
        return repr(job)
    steps = ", ".join(f"{s['name']} {s['status']} ({s['detail']!r})" for s in job.get("steps", []))
    error = job.get("error")
    return f"{job.get('job_id')} {job['status']}, attempt {job.get('attempt')}, error {error!r}; steps: {steps}"


async def read_job(client: httpx.AsyncClient, job_id: str) -> Any:
    """The job as GET /ops/jobs/{job_id} returns it."""
    return (await client.get(f"/ops/jobs/{job_id}")).json()


async def wait_for_status(client: httpx.AsyncClient, job_id: str, *statuses: str, within: float = 5.0) -> Any:
    """Poll the job through the API until it is in one of `statuses`; fail with its last status and steps."""
    return await wait_for(
        lambda: read_job(client, job_id), within, until=lambda job: job["status"] in statuses, show=job_summary
    )


async def fetch_one(db: asyncpg.Connection, query: str, *args: object) -> dict[str, Any]:
    row = await db.fetchrow(query, *args)
    assert row is not None, f"no row for {query} {args}"
    return dict(row)


def free_port() -> int:
    """A port nothing listens on (yet): for a server to start on, or to stand for a service that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The simulated Kubernetes cluster, for the pg-rebuild tests.


@asynccontextmanager
async def shipped_role_cluster(profile: str = "zalando") -> AsyncIterator[KubeSim]:
    """The sample cluster at test speed, enforcing the workers' Role as shipped (deploy/worker-rbac.yaml): a call the
    Role does not grant is a 403, as on a real cluster, and fails the test here even if the job coped with it."""
    async with KubeSim.running(profile=profile, speed="fast", rbac=Rbac.load()) as sim:
        yield sim
    assert sim.rbac is not None
    assert not sim.rbac.denied, "the shipped Role refused: " + "; ".join(sim.rbac.denied)


@pytest.fixture
async def kube_sim() -> AsyncIterator[KubeSim]:
    """The sample cluster (namespace `db`, StatefulSet `pg`, pg-0 primary) at test speed, zalando labels, under the
    shipped Role."""
    async with shipped_role_cluster() as sim:
        yield sim


@pytest.fixture
async def cnpg_sim() -> AsyncIterator[KubeSim]:
    """A CloudNativePG Cluster `pg` in `db` (pg-1 primary, pg-2 and pg-3 replicas) at test speed, under the shipped
    Role."""
    async with shipped_role_cluster("cnpg") as sim:
        yield sim


def kube_settings_for(sim: KubeSim, path: Path, **overrides: Any) -> PgRebuildSettings:
    """pg-rebuild's settings for `sim`: a kubeconfig for it and waits short enough for tests."""
    kubeconfig = sim.write_kubeconfig(path, context="sim")
    values: dict[str, Any] = {
        "kubeconfig": kubeconfig,
        "kube_request_timeout_s": 5.0,
        "pg_rebuild_poll_interval_s": 0.05,
        "pg_rebuild_unschedulable_grace_s": 1.0,
        "pg_rebuild_pvc_release_grace_s": 1.0,
    }
    return PgRebuildSettings(**(values | overrides))


def kube_registry(kube: PgRebuildSettings) -> Registry:
    """The test job types, the pg-* ones configured with `kube` (each with the fields of its own settings): for
    `running_worker` and `api_client`."""
    shared = PgSettings.model_validate(kube.model_dump(include=set(PgSettings.model_fields)))
    others = (pg_switchover.JOB, pg_restart.JOB, pg_reinit.JOB)
    return TEST_REGISTRY.with_settings({pg_rebuild.JOB.name: kube} | {t.name: shared for t in others})


@pytest.fixture
def kube_settings(kube_sim: KubeSim, tmp_path: Path) -> PgRebuildSettings:
    return kube_settings_for(kube_sim, tmp_path / "kubeconfig")


async def run_pg_job(
    client: httpx.AsyncClient,
    settings: Settings,
    kube: PgRebuildSettings,
    job_type: str,
    within: float = 20,
    **params: Any,
) -> Any:
    """Run a `job_type` job on db/pg (`params` added) to its end on a worker whose pg-* settings are `kube`; the job."""
    async with running_worker(settings, kube_registry(kube)):
        job_id = await submit(client, job_type, **({"namespace": "db", "cluster": "pg"} | params))
        return await wait_for_status(client, job_id, "success", "failed", within=within)


def step_details(job: Any) -> dict[str, str]:
    """Each step's detail, by step name."""
    return {s["name"]: s["detail"] for s in job["steps"]}


@asynccontextmanager
async def live_api(settings: Settings) -> AsyncIterator[str]:
    """The app served over real HTTP by uvicorn inside the test's event loop (for streams, and real clients);
    yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, TEST_REGISTRY), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:

        async def started() -> bool:
            return server.started

        await wait_for(started, within=10, interval=0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


async def submit(client: httpx.AsyncClient, job_type: str = "noop", **params: Any) -> str:
    """Submit a job that must be accepted; its id."""
    response = await client.post(f"/ops/jobs/{job_type}", json=params)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id
