"""`restart-replica`, the guide's worked example, tested with the job author's kit (tests/kit.py)."""

from __future__ import annotations

from tests.guide_example import JOB
from tests.kit import JobKit, KitFactory, step_of

PARAMS = {"namespace": "db", "cluster": "pg", "pod": "pg-1"}


def uid(kit: JobKit, pod: str) -> str:
    found = kit.cluster.pod(pod)
    assert found is not None, f"no pod {pod}"
    return str(found["metadata"]["uid"])


async def test_restarts_the_replica_as_a_new_pod(job_kit: KitFactory) -> None:
    kit = await job_kit(JOB, cluster=True)
    old = uid(kit, "pg-1")

    job = await kit.run_to_end(await kit.submit("restart-replica", **PARAMS))

    assert job["status"] == "success", job
    new = uid(kit, "pg-1")
    assert new != old
    assert step_of(job, "delete-pod")["detail"] == f"deleted pod pg-1 (uid {old})"
    assert step_of(job, "wait-ready")["detail"] == f"pod pg-1 (uid {old} -> {new}) Ready as replica"
    assert kit.cluster.primary() == "pg-0"


async def test_refuses_the_primary_and_deletes_nothing(job_kit: KitFactory) -> None:
    kit = await job_kit(JOB, cluster=True)
    before = uid(kit, "pg-0")

    job = await kit.run_to_end(await kit.submit("restart-replica", **PARAMS | {"pod": "pg-0"}))

    assert job["status"] == "failed"
    assert job["error"].startswith("step check-replica failed: Refused: pod pg-0 is not a Ready replica")
    assert step_of(job, "delete-pod")["status"] == "pending"
    assert uid(kit, "pg-0") == before


async def test_a_container_that_crash_loops_fails_the_wait_at_once(job_kit: KitFactory) -> None:
    kit = await job_kit(JOB, cluster=True)
    kit.cluster.crash_loop("pg-1")  # faults follow the name: the replacement pod crash-loops

    job = await kit.run_to_end(await kit.submit("restart-replica", **PARAMS), within=10)

    assert job["status"] == "failed"
    wait = step_of(job, "wait-ready")
    assert wait["detail"].startswith("error: WontHeal: pod pg-1 container postgres: CrashLoopBackOff"), wait
    assert wait["attempts"] == 1, "a condition that will not heal is not retried"


async def test_worker_dying_while_waiting_resumes_the_wait_and_deletes_nothing_twice(job_kit: KitFactory) -> None:
    kit = await job_kit(JOB, cluster=True)
    kit.cluster.unschedulable("pg-1")  # the replacement stays Pending: the job sits in wait-ready
    deletes = kit.cluster.slow(0, verb="delete", resource="pods")  # counts the DELETE requests
    job_id = await kit.submit("restart-replica", **PARAMS)

    async with kit.worker_dies_during(job_id, step="wait-ready", detail="Unschedulable") as death:
        kit.cluster.set_behaviour("pg-1", None)  # the cluster heals while no worker runs the job

    job = await kit.run_to_end(job_id)
    assert job["status"] == "success", job
    assert job["attempt"] == death.attempt + 1
    assert [(s["name"], s["attempts"]) for s in job["steps"]] == [
        ("check-replica", 1),
        ("delete-pod", 1),
        ("wait-ready", 2),  # the step in flight ran again; the finished ones did not
    ]
    assert deletes.hits == 1, "the pod was deleted once"
    claims = [e for e in await kit.events(job_id) if e["kind"] == "claimed"]
    assert len({e["actor"] for e in claims}) == 2, "a second worker took the job over"


async def test_worker_dying_while_its_delete_is_in_flight_deletes_nothing_twice(job_kit: KitFactory) -> None:
    # A lease of 4 s: the delete, held 1 s by the cluster, lands well before another worker can take over.
    kit = await job_kit(JOB, cluster=True, lease_ttl_s=4)
    old = uid(kit, "pg-1")
    kit.cluster.slow(1.0, verb="delete", resource="pods", times=1)
    deletes = kit.cluster.slow(0, verb="delete", resource="pods")
    job_id = await kit.submit("restart-replica", **PARAMS)

    async with kit.worker_dies_during(job_id, step="delete-pod", when=lambda: deletes.hits == 1):
        pass  # the worker died after sending the delete, before its answer

    job = await kit.run_to_end(job_id)
    assert job["status"] == "success", job
    delete = step_of(job, "delete-pod")
    assert delete["attempts"] == 2
    assert delete["detail"] in (f"pod pg-1 (uid {old}) already terminating", f"pod pg-1 (uid {old}) already gone")
    assert deletes.hits == 1, "the step that ran again saw the delete done and did not send another"
