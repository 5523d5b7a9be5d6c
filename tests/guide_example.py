"""`restart-replica`: restart one replica pod of a PostgreSQL cluster on Kubernetes.

The worked example of docs/job-development.md, run by tests/test_guide_example.py. The pod is deleted with a uid
precondition; its StatefulSet recreates it under the same name, and the job is done when the new pod (a new uid)
is Ready with the replica role. The primary is refused: restarting it would be a failover.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from jobs.pgkube.kube import Kube, KubeClients, KubeNotConfigured, PodView
from jobs.pgkube.kube import lifespan as kube_lifespan
from jobs.pgkube.profiles import PROFILES, ProfileName
from jobs.pgkube.settings import KubeSettings
from jobs.pgkube.waiting import PodWatch, Seen, WontHeal, describe_pod, wait_until
from service.jobtypes import JobType, Step, StepContext

Name = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
MAX_WAIT_S = 3600
# How often the wait reads the pod: one GET, cheap enough to see a Ready pod within a second.
POLL_S = 0.5
# A new pod may stay Unschedulable this long (a node draining, a volume attaching) before the job gives up.
UNSCHEDULABLE_GRACE_S = 120


class RestartParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    namespace: Name = Field(description="the cluster's namespace")
    cluster: Name = Field(description="the PostgreSQL cluster's name")
    pod: Name = Field(description="the replica pod to restart")
    profile: ProfileName = Field("zalando", description="the operator's label convention")
    ready_timeout_s: float = Field(600, gt=0, le=MAX_WAIT_S, description="for the new pod to be Ready as a replica")


def target(params: RestartParams) -> str:
    # With target_kind="k8s" below, pg-rebuild's target for the same cluster: the two never act on it at once.
    return f"default/{params.namespace}/{params.cluster}"


class Refused(Exception):
    """The pod is not one this job may restart."""


def kube_of(ctx: StepContext) -> Kube:
    clients = ctx.resource  # what kube_lifespan yielded in this worker process
    if not isinstance(clients, KubeClients):
        raise KubeNotConfigured("this worker has no Kubernetes clients")
    return clients.kube(None)  # the kubeconfig's current context


async def read_pod(ctx: StepContext, params: RestartParams) -> PodView | None:
    return await kube_of(ctx).pod(params.namespace, params.pod)


async def check_replica(ctx: StepContext, params: RestartParams) -> str:
    """Reads the pod; changes nothing. Done when it is a Ready replica of the cluster, owned by a StatefulSet (which
    recreates it); its uid is remembered for the next steps. Refuses anything else."""
    profile = PROFILES[params.profile]
    pod = await read_pod(ctx, params)
    if pod is None or not profile.belongs(pod, params.cluster):
        raise Refused(f"pod {params.pod} is not a member of cluster {params.cluster}")
    if pod.owner_kind != "StatefulSet":
        raise Refused(f"pod {pod.name} is not owned by a StatefulSet: nothing would recreate it")
    if not profile.is_replica(pod) or not pod.ready:
        raise Refused(f"pod {pod.name} is not a Ready replica: {describe_pod(pod, profile.role(pod))}")
    await ctx.remember(old_uid=pod.uid)
    return f"pod {pod.name} (uid {pod.uid}) is a Ready {profile.role(pod)} on {pod.node}"


async def delete_pod(ctx: StepContext, params: RestartParams) -> str:
    """Deletes the pod with the remembered uid as a precondition. Done when that pod is Terminating or gone; a pod
    with another uid is already the replacement and is left alone, so a re-run never deletes twice."""
    old_uid: str = ctx.state["old_uid"]
    pod = await read_pod(ctx, params)
    if pod is None or pod.uid != old_uid:
        return f"pod {params.pod} (uid {old_uid}) already gone"
    if pod.deleting:
        return f"pod {pod.name} (uid {old_uid}) already terminating"
    outcome = await kube_of(ctx).delete_pod(params.namespace, pod.name, old_uid, pod.grace_s)
    if outcome == "deleted":
        return f"deleted pod {pod.name} (uid {old_uid})"
    # 404: gone meanwhile; 409: the precondition failed, so the pod is already another one.
    return f"pod {pod.name} (uid {old_uid}) already gone ({outcome})"


async def wait_ready(ctx: StepContext, params: RestartParams) -> str:
    """Changes nothing; polls. Done when the pod has a new uid, is Ready and has the replica role. Fails fast on a
    container that will not start (CrashLoopBackOff, image pull errors), a pod Unschedulable for too long, and a
    pod that comes back as the primary."""
    old_uid: str = ctx.state["old_uid"]
    profile = PROFILES[params.profile]
    watch = PodWatch(UNSCHEDULABLE_GRACE_S)

    async def probe() -> Seen[str]:
        pod = await read_pod(ctx, params)
        if pod is None or pod.uid == old_uid:
            return Seen(f"remaining: {params.pod} (old pod {'gone' if pod is None else 'terminating'})")
        watch.check(pod)  # raises WontHeal
        if profile.is_primary(pod):
            raise WontHeal(f"pod {pod.name} came back as the primary")
        if pod.ready and profile.is_replica(pod):
            return Seen("", f"pod {pod.name} (uid {old_uid} -> {pod.uid}) Ready as {profile.role(pod)}")
        return Seen(f"remaining: {describe_pod(pod)}")

    return await wait_until(
        ctx, probe, what="waiting for the new pod", timeout_s=params.ready_timeout_s, interval_s=POLL_S
    )


JOB = JobType[RestartParams](
    name="restart-replica",
    description="Restart one replica pod of a PostgreSQL cluster: delete it, wait until its replacement is Ready.",
    params=RestartParams,
    steps=[
        Step("check-replica", check_replica, timeout_s=30, max_attempts=5),
        Step("delete-pod", delete_pod, timeout_s=30, max_attempts=5),
        # The param bounds the wait; the step's deadline is a backstop above the largest one allowed.
        Step("wait-ready", wait_ready, timeout_s=MAX_WAIT_S + 60, max_attempts=3),
    ],
    target=target,
    target_kind="k8s",  # the namespace of targets it shares with every job acting on PostgreSQL on Kubernetes
    lifespan=kube_lifespan,
    settings=KubeSettings,  # APIOPS_KUBECONFIG, APIOPS_KUBE_CONTEXTS, ...: what kube_lifespan is handed
)
