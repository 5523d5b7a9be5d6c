"""Scheduler and kubelet in one: walks each pod through its life as the job will observe it.

Pending (unscheduled) -> PodScheduled -> ContainerCreating -> Running -> Ready, and on deletion
deletionTimestamp -> gone after the grace period (capped by `Speed.terminate`). The stage is read back from the
pod itself, so seeded pods and pods edited by tests need no bookkeeping. Pod faults divert the walk: an
unschedulable pod never gets a node, a crash-looping one restarts for ever, a not-ready one fails its probe.
"""

from __future__ import annotations

import random

from tests.kube_sim.faults import Behaviour, Faults
from tests.kube_sim.objects import condition, container_status
from tests.kube_sim.store import Obj, Store, now_ts
from tests.kube_sim.timing import Speed, Timers

NODES = ("node-a", "node-b", "node-c")
UNSCHEDULABLE_MESSAGE = (
    "0/3 nodes are available: 3 Insufficient memory. preemption: 0/3 nodes are available: "
    "3 No preemption victims found for incoming pod."
)
CONFIG_ERROR_MESSAGE = 'secret "pg-credentials" not found'
IMAGE_PULL_MESSAGE = 'failed to pull and unpack image "ghcr.io/zalando/spilo-16:3.3-p1": not found'


def is_ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def pod_claims(pod: Obj) -> list[str]:
    volumes = pod["spec"].get("volumes") or []
    return [v["persistentVolumeClaim"]["claimName"] for v in volumes if v.get("persistentVolumeClaim")]


def set_condition(pod: Obj, cond: Obj) -> None:
    """Replace a condition by type, keeping the old one (and its transition time) when nothing changed."""
    conditions: list[Obj] = pod["status"].setdefault("conditions", [])
    for i, old in enumerate(conditions):
        if old["type"] == cond["type"]:
            same = all(old.get(k) == cond.get(k) for k in ("status", "reason", "message"))
            if not same:
                conditions[i] = cond
            return
    conditions.append(cond)


def _waiting(reason: str, message: str | None = None) -> Obj:
    waiting: Obj = {"reason": reason}
    if message:
        waiting["message"] = message
    return {"waiting": waiting}


def stage_of(pod: Obj) -> str:
    if pod["metadata"].get("deletionTimestamp"):
        return "terminating"
    statuses = pod["status"].get("containerStatuses") or []
    if not pod["spec"].get("nodeName") or not statuses:
        return "unscheduled"
    state = statuses[0].get("state") or {}
    if "running" in state:
        return "ready" if statuses[0].get("ready") else "running"
    reason = (state.get("waiting") or {}).get("reason", "")
    return {
        "ErrImagePull": "image_pull",
        "ImagePullBackOff": "image_pull",
        "CrashLoopBackOff": "crash_loop",
        "CreateContainerConfigError": "config_error",
    }.get(reason, "creating")


class Kubelet:
    def __init__(self, store: Store, faults: Faults, speed: Speed) -> None:
        self.store = store
        self.faults = faults
        self.speed = speed
        self.timers = Timers()

    def reconcile(self, now: float) -> None:
        pods = self.store.objects("pods")
        for pod in pods:
            stage = stage_of(pod)
            elapsed = self.timers.elapsed(pod["metadata"]["uid"], stage, now)
            behaviour = self.faults.pod_behaviour(pod["metadata"]["namespace"], pod["metadata"]["name"])
            self._step(pod, stage, elapsed, behaviour)
        self.timers.forget({p["metadata"]["uid"] for p in pods})

    def _step(self, pod: Obj, stage: str, elapsed: float, behaviour: Behaviour | None) -> None:
        if stage == "terminating":
            grace = pod["metadata"].get("deletionGracePeriodSeconds", 30)
            if elapsed >= min(float(grace), self.speed.terminate):
                self.store.remove("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
            return
        if stage == "unscheduled":
            self._schedule(pod, elapsed, behaviour)
        elif stage in ("creating", "image_pull", "config_error", "crash_loop"):
            self._start(pod, stage, elapsed, behaviour)
        else:
            self._probe(pod, stage, elapsed, behaviour)
        self.store.update("pods", pod)

    def _schedule(self, pod: Obj, elapsed: float, behaviour: Behaviour | None) -> None:
        if behaviour is Behaviour.UNSCHEDULABLE:
            set_condition(pod, condition("PodScheduled", False, "Unschedulable", UNSCHEDULABLE_MESSAGE))
            return
        namespace = pod["metadata"]["namespace"]
        for claim in pod_claims(pod):
            pvc = self.store.get("persistentvolumeclaims", namespace, claim)
            if pvc is None:
                message = f'persistentvolumeclaim "{claim}" not found'
            elif pvc["metadata"].get("deletionTimestamp"):
                message = f'persistentvolumeclaim "{claim}" is being deleted'
            elif pvc["status"].get("phase") != "Bound":
                return  # immediate binding: the binder will get there
            else:
                continue
            set_condition(pod, condition("PodScheduled", False, "Unschedulable", message))
            return
        if elapsed >= self.speed.schedule:
            place(pod)

    def _start(self, pod: Obj, stage: str, elapsed: float, behaviour: Behaviour | None) -> None:
        name = _container(pod)
        if stage == "creating" and elapsed < self.speed.create:
            return
        status = pod["status"]
        if behaviour is Behaviour.IMAGE_PULL:
            # The kubelet alternates a failed pull with a back-off wait.
            attempt = int(elapsed // self.speed.crash) if stage == "image_pull" else 0
            reason = "ErrImagePull" if attempt % 2 == 0 else "ImagePullBackOff"
            status["containerStatuses"] = [container_status(name, state=_waiting(reason, IMAGE_PULL_MESSAGE))]
        elif behaviour is Behaviour.CONFIG_ERROR:
            state = _waiting("CreateContainerConfigError", CONFIG_ERROR_MESSAGE)
            status["containerStatuses"] = [container_status(name, state=state)]
        elif behaviour is Behaviour.CRASH_LOOP:
            restarts = 1 + int(elapsed // self.speed.crash) if stage == "crash_loop" else 1
            last = {"terminated": {"exitCode": 1, "reason": "Error", "startedAt": now_ts(), "finishedAt": now_ts()}}
            back_off = f"back-off 10s restarting failed container={name} pod={pod['metadata']['name']}"
            old = (status.get("containerStatuses") or [{}])[0].get("lastState")
            status["phase"] = "Running"
            status["containerStatuses"] = [
                container_status(
                    name,
                    state=_waiting("CrashLoopBackOff", back_off),
                    restarts=restarts,
                    started=False,
                    # Keep the old lastState while the count is unchanged, so an idle tick writes nothing.
                    last_state=old if old and stage == "crash_loop" and restarts == self._restarts(pod) else last,
                )
            ]
        else:
            run_container(pod)

    def _probe(self, pod: Obj, stage: str, elapsed: float, behaviour: Behaviour | None) -> None:
        set_ready(pod, behaviour is not Behaviour.NOT_READY and (stage == "ready" or elapsed >= self.speed.ready))

    @staticmethod
    def _restarts(pod: Obj) -> int:
        statuses = pod["status"].get("containerStatuses") or [{}]
        return int(statuses[0].get("restartCount", 0))


def _container(pod: Obj) -> str:
    return str(pod["spec"]["containers"][0]["name"])


def _ordinal(pod: Obj) -> int:
    suffix = pod["metadata"]["name"].rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def place(pod: Obj) -> None:
    """The scheduler's and kubelet's first writes: a node, PodScheduled, and a container being created."""
    ordinal = _ordinal(pod)
    pod["spec"]["nodeName"] = NODES[ordinal % len(NODES)]
    pod["status"] |= {"hostIP": f"10.0.0.{10 + ordinal % len(NODES)}", "startTime": now_ts()}
    set_condition(pod, condition("PodScheduled", True))
    set_condition(pod, condition("Initialized", True))
    set_condition(pod, condition("Ready", False, "ContainersNotReady", "containers with unready status: [postgres]"))
    set_condition(pod, condition("ContainersReady", False, "ContainersNotReady"))
    pod["status"]["containerStatuses"] = [container_status(_container(pod), state=_waiting("ContainerCreating"))]


def run_container(pod: Obj) -> None:
    statuses = pod["status"].get("containerStatuses") or [{}]
    restarts = int(statuses[0].get("restartCount", 0))
    octet = random.randint(2, 254)  # a replacement pod gets a new IP, as it would in a cluster
    pod["status"] |= {"phase": "Running", "podIP": f"10.244.{_ordinal(pod) % len(NODES)}.{octet}"}
    state = {"running": {"startedAt": now_ts()}}
    status = container_status(_container(pod), state=state, restarts=restarts, started=True)
    pod["status"]["containerStatuses"] = [status]


def set_ready(pod: Obj, ready: bool) -> None:
    if ready:
        set_condition(pod, condition("Ready", True))
        set_condition(pod, condition("ContainersReady", True))
    else:
        message = "containers with unready status: [postgres]"
        set_condition(pod, condition("Ready", False, "ContainersNotReady", message))
        set_condition(pod, condition("ContainersReady", False, "ContainersNotReady", message))
    pod["status"]["containerStatuses"][0]["ready"] = ready


def settle(pod: Obj) -> None:
    """Make a fresh pod look as if it had been Running and Ready for a while (for seeding a cluster)."""
    place(pod)
    run_container(pod)
    set_ready(pod, True)
