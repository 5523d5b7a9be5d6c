"""`KubeSim`: the simulated cluster as one object, served over real HTTP in the caller's event loop.

    async with KubeSim.running(profile="zalando") as sim:
        sim.write_kubeconfig(tmp_path / "kubeconfig")
        sim.crash_loop("pg-1")  # faults are keyed by name, so they hit the recreated pod too
        ...

The seed/fault/state methods are synchronous and take effect at once: everything runs on one event loop, so a
test never races the controllers in the middle of a write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import uvicorn

from tests.kube_sim.api import KubeApi
from tests.kube_sim.cnpg import PLURAL as CNPG_CLUSTERS
from tests.kube_sim.cnpg import RESTART_ANNOTATION, Cnpg, InstanceRestart, Promotion
from tests.kube_sim.controllers import Controllers, bind
from tests.kube_sim.faults import (
    Behaviour,
    Faults,
    HttpFault,
    Latency,
    MemberFault,
    PatroniFault,
    WatchCut,
    parse_request_fault,
)
from tests.kube_sim.kubelet import is_ready, settle
from tests.kube_sim.objects import PROFILES, Profile, namespace_obj, pod_from_statefulset, pvc_from_template, revision
from tests.kube_sim.objects import statefulset as statefulset_obj
from tests.kube_sim.patroni import Action, ClusterState, Patroni, SwitchoverRecord
from tests.kube_sim.rbac import Authorizing, Rbac
from tests.kube_sim.store import DEFAULT_HISTORY, Obj, Store
from tests.kube_sim.timing import SPEEDS, Speed

log = logging.getLogger(__name__)

NAMESPACE = "db"
CLUSTER = "pg"


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (the owner of the event loop decides when to stop) and without its
    0.1 s polling for `should_exit`, which would add that much to every test's teardown."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.exit_requested = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield

    async def main_loop(self) -> None:
        await self.on_tick(0)  # sets the default response headers once
        await self.exit_requested.wait()

    def request_exit(self) -> None:
        self.should_exit = True
        self.exit_requested.set()


# What POST /_sim/faults takes as "kind" (see KubeSim.apply_fault).
PATRONI_FAULT_KINDS = ("patroni", "lag", "leader_lost", "member", "lag_after_restart", "pending_restart")
FAULT_KINDS = (
    "http", "latency", "watch_cut", "cut_watches", "compact", "pod", "pvc_stuck", "rollout", "primary_change",
    *PATRONI_FAULT_KINDS,
)  # fmt: skip


def _behaviour(name: object) -> Behaviour | None:
    if not name:
        return None
    try:
        return Behaviour(str(name))
    except ValueError:
        raise ValueError(f"unknown pod behaviour {name!r}; they are {', '.join(Behaviour)}, or null") from None


class KubeSim:
    def __init__(
        self,
        profile: str = "zalando",
        speed: Speed | str = "fast",
        history: int = DEFAULT_HISTORY,
        rbac: Rbac | None = None,
    ) -> None:
        self.profile: Profile = PROFILES[profile]
        self.speed = SPEEDS[speed] if isinstance(speed, str) else speed
        self.store = Store(history)
        self.faults = Faults()
        self.controllers = Controllers(self.store, self.faults, self.speed, self.profile)
        self.patroni = Patroni(self.store, self.faults, self.speed, self.profile)
        self.cnpg = Cnpg(self.store, self.speed, self.profile)
        self.api = KubeApi(self.store, self.faults, self.patroni, self.apply_fault)
        # When given, every request is authorized as its user (tests.kube_sim.rbac); None: everything is allowed.
        self.rbac = rbac
        self.url = ""
        self.port = 0
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[None]] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls,
        profile: str = "zalando",
        speed: Speed | str = "fast",
        *,
        seed: bool = True,
        port: int = 0,
        history: int = DEFAULT_HISTORY,
        rbac: Rbac | None = None,
    ) -> AsyncIterator[KubeSim]:
        """Serve on 127.0.0.1 (a free port unless given) with the sample cluster seeded, for a `with` block;
        under `rbac`'s roles when given."""
        sim = cls(profile, speed, history, rbac)
        if seed:
            sim.seed_cluster()
        await sim.start(port=port)
        try:
            yield sim
        finally:
            await sim.stop()

    # lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP, and
        # without it every keep-alive request waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.port = sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        # log_config=None: leave the host process's logging alone; ws="none": no websocket library needed.
        app = self.api.app() if self.rbac is None else Authorizing(self.api.app(), self.rbac)
        config = uvicorn.Config(
            app, log_config=None, lifespan="off", ws="none", access_log=False, timeout_graceful_shutdown=2
        )
        self._server = _Server(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]), name="kube-sim-http")
        while not self._server.started:
            if self._serving.done():
                self._serving.result()  # surfaces the start-up error
                raise RuntimeError("kube-sim server stopped during start-up")
            await asyncio.sleep(0.005)
        self._loops = [
            asyncio.create_task(self.controllers.run(name, step), name=f"kube-sim-{name}")
            for name, step in (
                self.controllers.loops() | {"patroni-ha": self.patroni.reconcile, "cnpg": self.cnpg.reconcile}
            ).items()
        ]
        log.info("kube-sim serving %s (profile %s)", self.url, self.profile.name)

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        self.patroni.stop()
        # Open watches would otherwise hold uvicorn's graceful shutdown until their timeoutSeconds.
        self.store.cut_watches()
        if self._server is not None and self._serving is not None:
            self._server.request_exit()
            await self._serving
        self._server = self._serving = None

    def write_kubeconfig(self, path: str | Path, context: str = "sim", namespace: str = NAMESPACE) -> Path:
        """A kubeconfig that load_kube_config accepts as is (JSON is YAML); the token is never checked."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kube-sim", "cluster": {"server": self.url}}],
            "users": [{"name": "kube-sim", "user": {"token": "kube-sim-dummy-token"}}],
            "contexts": [
                {"name": context, "context": {"cluster": "kube-sim", "user": "kube-sim", "namespace": namespace}}
            ],
            "current-context": context,
        }
        target = Path(path)
        target.write_text(json.dumps(config, indent=2) + "\n")
        return target

    # seeding

    def seed_cluster(self, namespace: str = NAMESPACE, name: str = CLUSTER, replicas: int = 3) -> Obj:
        """A settled cluster: StatefulSet `name` with Ready members `name-0..`, `name-0` primary, PVCs Bound; on the
        cnpg profile a CloudNativePG Cluster `name` instead, its instances `name-1..`, `name-1` primary."""
        if self.store.get("namespaces", "", namespace) is None:
            self.store.create("namespaces", namespace_obj(namespace))
        if self.profile.name == "cnpg":
            return self.cnpg.seed(namespace, name, replicas)
        sts = self.store.create(
            "statefulsets", statefulset_obj(name, namespace, self.profile.labels_for(name), replicas)
        )
        rev = revision(name, sts["spec"]["template"])
        for ordinal in range(replicas):
            pod = pod_from_statefulset(sts, ordinal, rev)
            for template in sts["spec"]["volumeClaimTemplates"]:
                pvc = self.store.create(
                    "persistentvolumeclaims", pvc_from_template(sts, template, pod["metadata"]["name"])
                )
                bind(pvc)
                self.store.update("persistentvolumeclaims", pvc)
            settle(pod)
            self.profile.set_role(pod, self.profile.primary if ordinal == 0 else self.profile.replica)
            self.store.create("pods", pod)
        # Fill in the StatefulSet's status now, so the seeded state is complete before the first tick.
        self.controllers.reconcile_statefulsets(0.0)
        return self.store.get("statefulsets", namespace, name) or sts

    # state

    def pod(self, name: str, namespace: str = NAMESPACE) -> Obj | None:
        return self.store.get("pods", namespace, name)

    def pvc(self, name: str, namespace: str = NAMESPACE) -> Obj | None:
        return self.store.get("persistentvolumeclaims", namespace, name)

    def statefulset(self, name: str = CLUSTER, namespace: str = NAMESPACE) -> Obj | None:
        return self.store.get("statefulsets", namespace, name)

    def cnpg_cluster(self, name: str = CLUSTER, namespace: str = NAMESPACE) -> Obj | None:
        """The CloudNativePG Cluster (cnpg profile)."""
        return self.store.get(CNPG_CLUSTERS, namespace, name)

    def cnpg_promote(self, to: str, cluster: str = CLUSTER, namespace: str = NAMESPACE) -> None:
        """What `kubectl cnpg promote` does: name `to` the Cluster's target primary, and the operator switches over
        to it; a name that is no instance leaves the Cluster switching over for good."""
        found = self.cnpg_cluster(cluster, namespace)
        if found is None:
            raise ValueError(f"no CloudNativePG Cluster {namespace}/{cluster}")
        found["status"] |= {
            "targetPrimary": to,
            "phase": "Switchover in progress",
            "phaseReason": f"Switching over to {to}",
        }
        self.store.update(CNPG_CLUSTERS, found)

    def cnpg_restart(self, at: str, cluster: str = CLUSTER, namespace: str = NAMESPACE) -> None:
        """What `kubectl cnpg restart` does: the Cluster's restartedAt annotation set to `at`; its operator rolls."""
        found = self.cnpg_cluster(cluster, namespace)
        if found is None:
            raise ValueError(f"no CloudNativePG Cluster {namespace}/{cluster}")
        found["metadata"].setdefault("annotations", {})[RESTART_ANNOTATION] = at
        self.store.update(CNPG_CLUSTERS, found)

    def cnpg_spec(self, cluster: str = CLUSTER, namespace: str = NAMESPACE, **spec: Any) -> None:
        """Sets fields of the Cluster's spec (`primaryUpdateMethod="switchover"`); a field given as None is removed."""
        found = self.cnpg_cluster(cluster, namespace)
        if found is None:
            raise ValueError(f"no CloudNativePG Cluster {namespace}/{cluster}")
        found["spec"] = {k: v for k, v in (found["spec"] | spec).items() if v is not None}
        self.store.update(CNPG_CLUSTERS, found)

    @property
    def cnpg_restarts(self) -> list[InstanceRestart]:
        """Every instance CloudNativePG's operator restarted in a rolling restart, in order."""
        return list(self.cnpg.restarts)

    @property
    def promotions(self) -> list[Promotion]:
        """Every switchover CloudNativePG's operator carried out, in order."""
        return list(self.cnpg.history)

    def members(self, cluster: str = CLUSTER, namespace: str = NAMESPACE) -> list[Obj]:
        """The pods owned by the StatefulSet, or the CloudNativePG Cluster, named `cluster`."""
        owner = self.statefulset(cluster, namespace) or self.cnpg_cluster(cluster, namespace)
        uid = owner["metadata"]["uid"] if owner else None
        pods = self.store.objects("pods", namespace)
        return [p for p in pods if any(r.get("uid") == uid for r in p["metadata"].get("ownerReferences") or [])]

    def primary(self, cluster: str = CLUSTER, namespace: str = NAMESPACE) -> str | None:
        for pod in self.members(cluster, namespace):
            if self.profile.role_of(pod) in (self.profile.primary, "master", "primary"):
                return str(pod["metadata"]["name"])
        return None

    async def wait_for(self, check: Callable[[], bool], within: float = 5.0) -> None:
        """Wait until `check()` holds, re-checking after every write to the store and at least every tick."""
        _, queue = self.store.subscribe(None)
        try:
            async with asyncio.timeout(within):
                while not check():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(queue.get(), self.speed.tick)
        finally:
            self.store.unsubscribe(queue)

    # request faults

    def fail(
        self,
        status: int = 500,
        *,
        verb: str | None = None,
        resource: str | None = None,
        name: str | None = None,
        namespace: str | None = None,
        times: int | None = 1,
        retry_after: int | None = None,
        message: str | None = None,
    ) -> HttpFault:
        """Answer matching requests with `status` (a Status body; Retry-After when given), `times` times."""
        fault = HttpFault(
            verb=verb,
            resource=resource,
            namespace=namespace,
            name=name,
            times=times,
            status=status,
            retry_after=retry_after,
            message=message,
        )
        self.faults.http.append(fault)
        return fault

    def slow(
        self, seconds: float, *, verb: str | None = None, resource: str | None = None, times: int | None = None
    ) -> Latency:
        rule = Latency(verb=verb, resource=resource, times=times, seconds=seconds)
        self.faults.latency.append(rule)
        return rule

    def cut_watch(self, resource: str | None = None, *, after_events: int = 0, times: int | None = 1) -> WatchCut:
        """The next matching watch stream(s) end after `after_events` events, long before timeoutSeconds."""
        rule = WatchCut(verb="watch", resource=resource, times=times, after_events=after_events)
        self.faults.watch_cuts.append(rule)
        return rule

    def cut_watches(self) -> int:
        """End every open watch stream now."""
        return self.store.cut_watches()

    def compact(self) -> None:
        """Drop the event history: a watch from any earlier resourceVersion gets 410 Gone."""
        self.store.compact()

    def clear_faults(self) -> None:
        self.faults.clear()

    # pod, PVC and StatefulSet faults

    def set_behaviour(self, pod: str, behaviour: Behaviour | None, namespace: str = NAMESPACE) -> None:
        """Pod faults stick to the name: the StatefulSet's replacement pod inherits them. None clears."""
        if behaviour is None:
            self.faults.pods.pop((namespace, pod), None)
        else:
            self.faults.pods[(namespace, pod)] = behaviour

    def never_ready(self, pod: str, namespace: str = NAMESPACE) -> None:
        self.set_behaviour(pod, Behaviour.NOT_READY, namespace)

    not_ready = never_ready  # on a running member it turns Ready to False: "a member not Ready"

    def crash_loop(self, pod: str, namespace: str = NAMESPACE) -> None:
        self.set_behaviour(pod, Behaviour.CRASH_LOOP, namespace)

    def image_pull_error(self, pod: str, namespace: str = NAMESPACE) -> None:
        self.set_behaviour(pod, Behaviour.IMAGE_PULL, namespace)

    def config_error(self, pod: str, namespace: str = NAMESPACE) -> None:
        self.set_behaviour(pod, Behaviour.CONFIG_ERROR, namespace)

    def unschedulable(self, pod: str, namespace: str = NAMESPACE) -> None:
        self.set_behaviour(pod, Behaviour.UNSCHEDULABLE, namespace)

    def stuck_pvc(self, name: str, namespace: str = NAMESPACE) -> None:
        """pvc-protection never removes this claim's finalizer: it stays Terminating after its pod is gone."""
        self.faults.stuck_pvcs.add((namespace, name))

    def start_rollout(self, statefulset: str = CLUSTER, namespace: str = NAMESPACE) -> None:
        """The StatefulSet reports currentRevision != updateRevision (a rollout that does not progress)."""
        self.faults.rollouts.add((namespace, statefulset))
        self.controllers.reconcile_statefulsets(0.0)

    def change_primary(self, to: str | None = None, cluster: str = CLUSTER, namespace: str = NAMESPACE) -> str:
        """Fail over: the role label moves from the current primary to `to` (default: the first Ready replica). On a
        CloudNativePG Cluster its operator does it, within the speed's switchover delay (`cnpg_promote`)."""
        members = self.members(cluster, namespace)
        old = self.primary(cluster, namespace)
        if to is None:
            candidates = [p["metadata"]["name"] for p in members if p["metadata"]["name"] != old and is_ready(p)]
            if not candidates:
                raise ValueError(f"no Ready replica to promote in {namespace}/{cluster}")
            to = str(candidates[0])
        if self.cnpg_cluster(cluster, namespace) is not None:
            self.cnpg_promote(to, cluster, namespace)
            return to
        for pod in members:
            name = pod["metadata"]["name"]
            if name == to:
                self.profile.set_role(pod, self.profile.primary)
            elif name == old:
                self.profile.set_role(pod, self.profile.replica)
            else:
                continue
            self.store.update("pods", pod)
        self.patroni.promoted(namespace, cluster)
        return to

    # Patroni

    @property
    def switchovers(self) -> list[SwitchoverRecord]:
        """Every switchover Patroni carried out, in order."""
        return list(self.patroni.history)

    def patroni_requests(self, method: str = "POST", endpoint: str = "switchover") -> int:
        """How many such requests reached Patroni, on any member."""
        return sum(1 for m, e, _ in self.patroni.requests if (m, e) == (method, endpoint))

    def patroni_cluster(self, cluster: str = CLUSTER, namespace: str = NAMESPACE) -> ClusterState:
        """The cluster's Patroni state, to set `paused`, `synchronous_mode` and `sync_standby` on, or read
        `timeline`."""
        return self.patroni.cluster(namespace, cluster)

    def lag(self, pod: str, lag_bytes: int, namespace: str = NAMESPACE) -> None:
        """The member's replay position trails the leader's by `lag_bytes` (0: caught up)."""
        self.patroni.member(namespace, pod).lag = lag_bytes

    def tag(self, pod: str, namespace: str = NAMESPACE, **tags: Any) -> None:
        """Set Patroni tags on the member (`nofailover=True`); a tag given as None is removed."""
        mine = self.patroni.member(namespace, pod).tags
        mine.update(tags)
        for key in [k for k, v in mine.items() if v is None]:
            del mine[key]

    @property
    def restarts(self) -> list[str]:
        """Every member Patroni restarted through POST /restart, in order (of any namespace)."""
        return [pod for _, pod in self.patroni.restarts]

    @property
    def reinits(self) -> list[str]:
        """Every member Patroni began to re-clone through POST /reinitialize, in order."""
        return [pod for _, pod in self.patroni.reinits]

    def member_fault(self, pod: str, fault: MemberFault | None, namespace: str = NAMESPACE) -> None:
        """What Patroni's restart or re-clone does on the member (a crash loop, failing basebackups); None clears."""
        if fault is None:
            self.faults.members.pop((namespace, pod), None)
        else:
            self.faults.members[(namespace, pod)] = fault

    def lag_after_restart(self, pod: str, lag_bytes: int, namespace: str = NAMESPACE) -> None:
        """The member trails the leader by `lag_bytes` once a restart brought it back (until `lag(pod, 0)`)."""
        self.faults.lag_after_restart[(namespace, pod)] = lag_bytes

    def slow_restart(self, pod: str, seconds: float, namespace: str = NAMESPACE) -> None:
        """The member's restarts take `seconds` (its POST /restart waits all along)."""
        self.patroni.restart_s[(namespace, pod)] = seconds

    def recloning(self, pod: str, seconds: float = 60.0, namespace: str = NAMESPACE) -> None:
        """The member is being re-cloned for `seconds`, as if someone else had asked Patroni (not in `reinits`)."""
        self.patroni.reclone_s[(namespace, pod)] = seconds
        self.patroni.member(namespace, pod).action = Action("reinitialize", "creating replica")

    def pending_restart(self, *pods: str, namespace: str = NAMESPACE) -> None:
        """Patroni flags these members `pending_restart` (a changed parameter needs a restart to apply)."""
        for pod in pods:
            self.patroni.member(namespace, pod).pending_restart = True

    def patroni_answer(
        self,
        status: int,
        *,
        endpoint: str | None = "switchover",
        method: str = "post",
        pod: str | None = None,
        message: str | None = None,
        times: int | None = 1,
    ) -> PatroniFault:
        """Patroni answers matching requests with `status` and `message` (its usual words when None)."""
        fault = PatroniFault(verb=method, resource=endpoint, name=pod, times=times, status=status, message=message)
        self.faults.patroni.append(fault)
        return fault

    def lose_leader(
        self, to: str | None = None, seconds: float = 0.2, cluster: str = CLUSTER, namespace: str = NAMESPACE
    ) -> None:
        """During the next switchover the leader is lost: the cluster has none for `seconds`, then `to` leads
        (default: the candidate)."""
        self.patroni.cluster(namespace, cluster).lose_leader = (to, seconds)

    def slow_switchover(self, seconds: float, cluster: str = CLUSTER, namespace: str = NAMESPACE) -> None:
        """The next switchover takes `seconds` before the leader demotes (the request waits all along)."""
        self.patroni.cluster(namespace, cluster).switchover_s = seconds

    def apply_fault(self, spec: Obj) -> Obj:
        """The admin endpoint's entry point: POST /_sim/faults with one JSON object (DELETE clears all faults).

        {"kind": "http", "status": 429, "verb": "delete", "resource": "pods", "name": "pg-1", "times": 2,
         "retryAfter": 3, "message": "..."}          verb/resource/namespace/name/times optional
        {"kind": "latency", "seconds": 0.5, "verb": "get", "resource": "pods", "times": 1}
        {"kind": "watch_cut", "resource": "pods", "afterEvents": 0, "times": 1}
        {"kind": "cut_watches"}  {"kind": "compact"}
        {"kind": "pod", "name": "pg-1", "behaviour": "crash_loop"}   see Behaviour; null clears
        {"kind": "pvc_stuck", "name": "data-pg-1"}
        {"kind": "rollout", "statefulset": "pg"}
        {"kind": "primary_change", "to": "pg-2"}     "to" optional: the first Ready replica
        {"kind": "patroni", "status": 412, "endpoint": "switchover", "name": "pg-0", "message": "...", "times": 1}
        {"kind": "lag", "name": "pg-1", "bytes": 5242880}
        {"kind": "leader_lost", "to": "pg-2", "seconds": 1}     "to" optional: the candidate
        {"kind": "member", "name": "pg-1", "fault": "restart_crash_loop"}   see MemberFault; null clears
        {"kind": "lag_after_restart", "name": "pg-1", "bytes": 5242880}
        {"kind": "pending_restart", "name": "pg-1"}
        Request rules match any namespace unless "namespace" is given; the other kinds default to "db".
        """
        kind = spec.get("kind")
        ns = spec.get("namespace") or NAMESPACE
        if kind in ("http", "latency", "watch_cut"):
            self.faults.add(parse_request_fault(spec))
        elif kind == "pod":
            behaviour = _behaviour(spec.get("behaviour"))
            self.set_behaviour(spec["name"], behaviour, ns)
        elif kind == "pvc_stuck":
            self.stuck_pvc(spec["name"], ns)
        elif kind == "rollout":
            self.start_rollout(spec.get("statefulset") or CLUSTER, ns)
        elif kind == "primary_change":
            return {"primary": self.change_primary(spec.get("to"), spec.get("cluster") or CLUSTER, ns)}
        elif kind in PATRONI_FAULT_KINDS:
            self._patroni_fault(kind, spec, ns)
        elif kind == "cut_watches":
            return {"cut": self.cut_watches()}
        elif kind == "compact":
            self.compact()
        else:
            raise ValueError(f"unknown fault kind {kind!r}; the kinds are {', '.join(FAULT_KINDS)}")
        return {"added": kind}

    def _patroni_fault(self, kind: str, spec: Obj, ns: str) -> None:
        """The kinds of `apply_fault` that change what Patroni does."""
        if kind == "patroni":
            self.patroni_answer(
                int(spec.get("status", 503)),
                endpoint=spec.get("endpoint", "switchover"),
                method=spec.get("method", "post"),
                pod=spec.get("name"),
                message=spec.get("message"),
                times=spec.get("times", 1),
            )
        elif kind == "lag":
            self.lag(spec["name"], int(spec["bytes"]), ns)
        elif kind == "leader_lost":
            self.lose_leader(spec.get("to"), float(spec.get("seconds", 1.0)), spec.get("cluster") or CLUSTER, ns)
        elif kind == "member":
            fault = spec.get("fault")
            self.member_fault(spec["name"], MemberFault(fault) if fault else None, ns)
        elif kind == "lag_after_restart":
            self.lag_after_restart(spec["name"], int(spec["bytes"]), ns)
        else:
            self.pending_restart(spec["name"], namespace=ns)
