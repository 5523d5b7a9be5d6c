"""The control plane around the pods: PVC binder, pvc-protection, StatefulSet controller and Patroni's role labels.

Each controller is level-triggered like the real ones: every tick it reads the whole (small) store and moves
objects one step towards their goal. Writes that change nothing are dropped by the store, so an idle cluster
produces no watch events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tests.kube_sim.faults import Faults
from tests.kube_sim.kubelet import Kubelet, is_ready, pod_claims
from tests.kube_sim.objects import PVC_PROTECTION, Profile, pod_from_statefulset, pvc_from_template, revision
from tests.kube_sim.store import Obj, Store
from tests.kube_sim.timing import Speed, Timers

log = logging.getLogger(__name__)


def owned_by(obj: Obj, owner: Obj) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r.get("uid") == owner["metadata"]["uid"] and r.get("controller") for r in refs)


def bind(pvc: Obj) -> None:
    """Bind a claim to a (notional, dynamically provisioned) volume named after it."""
    pvc["spec"]["volumeName"] = f"pvc-{pvc['metadata']['uid']}"
    pvc["metadata"].setdefault("annotations", {}).update(
        {"pv.kubernetes.io/bind-completed": "yes", "pv.kubernetes.io/bound-by-controller": "yes"}
    )
    pvc["status"] = {
        "phase": "Bound",
        "accessModes": pvc["spec"].get("accessModes", ["ReadWriteOnce"]),
        "capacity": {"storage": pvc["spec"]["resources"]["requests"]["storage"]},
    }


class Controllers:
    def __init__(self, store: Store, faults: Faults, speed: Speed, profile: Profile) -> None:
        self.store = store
        self.faults = faults
        self.speed = speed
        self.profile = profile
        self.kubelet = Kubelet(store, faults, speed)
        # One timer table per controller: each forgets what it no longer tracks.
        self.bind_timers = Timers()
        self.member_timers = Timers()
        self.role_timers = Timers()

    def loops(self) -> dict[str, Callable[[float], None]]:
        return {
            "binder": self.bind_claims,
            "pvc-protection": self.release_claims,
            "kubelet": self.kubelet.reconcile,
            "statefulset": self.reconcile_statefulsets,
            "patroni": self.label_roles,
        }

    async def run(self, name: str, step: Callable[[float], None]) -> None:
        """Run one controller until cancelled; a bug in one tick is logged and the loop goes on, as a real
        controller's work queue would retry."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                step(loop.time())
            except Exception:
                log.exception("kube-sim controller %s failed", name)
            await asyncio.sleep(self.speed.tick)

    # PVCs

    def bind_claims(self, now: float) -> None:
        pending = set()
        for pvc in self.store.objects("persistentvolumeclaims"):
            meta, status = pvc["metadata"], pvc["status"]
            if status.get("phase") != "Pending" or meta.get("deletionTimestamp"):
                continue
            pending.add(meta["uid"])
            if self.bind_timers.elapsed(meta["uid"], "pending", now) >= self.speed.bind:
                bind(pvc)
                self.store.update("persistentvolumeclaims", pvc)
        self.bind_timers.forget(pending)

    def release_claims(self, now: float) -> None:
        """pvc-protection: a deleted claim keeps its finalizer while any pod, even a terminating one, uses it."""
        pods = self.store.objects("pods")
        for pvc in self.store.objects("persistentvolumeclaims"):
            meta = pvc["metadata"]
            if not meta.get("deletionTimestamp") or PVC_PROTECTION not in (meta.get("finalizers") or []):
                continue
            if (meta["namespace"], meta["name"]) in self.faults.stuck_pvcs:
                continue
            in_use = any(
                p["metadata"]["namespace"] == meta["namespace"] and meta["name"] in pod_claims(p) for p in pods
            )
            if not in_use:
                self.store.remove_finalizer("persistentvolumeclaims", pvc, PVC_PROTECTION)

    # StatefulSets

    def reconcile_statefulsets(self, now: float) -> None:
        missing: set[str] = set()
        for sts in self.store.objects("statefulsets"):
            current = revision(sts["metadata"]["name"], sts["spec"]["template"])
            pods = {p["metadata"]["name"]: p for p in self.store.objects("pods", sts["metadata"]["namespace"])}
            missing |= self._ensure_members(sts, pods, current, now)
            members = [p for p in self.store.objects("pods", sts["metadata"]["namespace"]) if owned_by(p, sts)]
            self._write_status(sts, members, current)
        self.member_timers.forget(missing)

    def _ensure_members(self, sts: Obj, pods: dict[str, Obj], rev: str, now: float) -> set[str]:
        """OrderedReady: create the lowest missing ordinal, but only while every lower one is Running and Ready.
        Returns the timer key of a member still waiting to be created."""
        name = sts["metadata"]["name"]
        for ordinal in range(int(sts["spec"].get("replicas", 1))):
            pod = pods.get(f"{name}-{ordinal}")
            if pod is None:
                return self._create_member(sts, ordinal, rev, now)
            if pod["metadata"].get("deletionTimestamp") or not is_ready(pod):
                break
        return set()

    def _create_member(self, sts: Obj, ordinal: int, rev: str, now: float) -> set[str]:
        ns, name = sts["metadata"]["namespace"], sts["metadata"]["name"]
        pod_name = f"{name}-{ordinal}"
        key = f"{ns}/{pod_name}"
        if self.member_timers.elapsed(key, "missing", now) < self.speed.recreate:
            return {key}
        claims: list[Obj] = []
        for template in sts["spec"].get("volumeClaimTemplates") or []:
            claim_name = f"{template['metadata']['name']}-{pod_name}"
            existing = self.store.get("persistentvolumeclaims", ns, claim_name)
            if existing is not None and existing["metadata"].get("deletionTimestamp"):
                return {key}  # the new pod would mount the dying claim; wait until it is gone
            if existing is None:
                claims.append(pvc_from_template(sts, template, pod_name))
        for claim in claims:
            self.store.create("persistentvolumeclaims", claim)
        pod = pod_from_statefulset(sts, ordinal, rev)
        self.store.create("pods", pod)
        log.debug("kube-sim statefulset %s/%s created pod %s", ns, name, pod_name)
        return set()

    def _write_status(self, sts: Obj, members: list[Obj], current: str) -> None:
        ns, name = sts["metadata"]["namespace"], sts["metadata"]["name"]
        update = (
            revision(name, sts["spec"]["template"], salt="rollout") if (ns, name) in self.faults.rollouts else current
        )
        ready = sum(1 for p in members if is_ready(p))

        def at(rev: str) -> int:
            return sum(1 for p in members if (p["metadata"].get("labels") or {}).get("controller-revision-hash") == rev)

        status: Obj = {
            "observedGeneration": sts["metadata"].get("generation", 1),
            "replicas": len(members),
            "currentRevision": current,
            "updateRevision": update,
            "collisionCount": 0,
        }
        # The API server omits zero counts (omitempty): readyReplicas is absent, not 0, on an unready set.
        counts = {"readyReplicas": ready, "availableReplicas": ready, "currentReplicas": at(current)}
        counts["updatedReplicas"] = at(update)
        status |= {key: value for key, value in counts.items() if value}
        sts["status"] = status
        self.store.update("statefulsets", sts)

    # Patroni

    def label_roles(self, now: float) -> None:
        """A member gets the replica role label only once it runs and is Ready, as Patroni labels a member
        only in state `running`. The primary's label is never touched here."""
        waiting = set()
        for pod in self.store.objects("pods"):
            meta = pod["metadata"]
            if meta.get("deletionTimestamp") or not meta.get("ownerReferences"):
                continue
            if self.profile.role_of(pod) is not None or not is_ready(pod):
                continue
            waiting.add(meta["uid"])
            if self.role_timers.elapsed(meta["uid"], "unlabelled", now) < self.speed.role:
                continue
            self.profile.set_role(pod, self.profile.replica)
            self.store.update("pods", pod)
        self.role_timers.forget(waiting)
