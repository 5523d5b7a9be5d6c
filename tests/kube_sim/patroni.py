"""Patroni on the simulated cluster's PostgreSQL members: each member's HA state and Patroni's REST API, which the
API layer serves through the pod proxy (`/api/v1/namespaces/{ns}/pods/{pod}:8008/proxy/{path}`).

The role labels stay the truth about who leads, as everywhere else in the sim (the `patroni` controller labels a
Ready member `replica`; `KubeSim.change_primary` fails over by moving the label); this module adds what only Patroni
knows: the timeline, each member's WAL position and lag, tags (`nofailover`), `pending_restart`, the cluster's
pause and synchronous mode, and a switchover carried out over simulated time and recorded in `history`.

The endpoints and their answers follow Patroni's REST API documentation ("Cluster status endpoints", "Switchover
and failover endpoints", "Restart endpoint", "Reinitialize endpoint") and its own code (patroni/api.py:
`do_POST_failover`, `is_failover_possible`, `poll_failover_result`, `do_POST_restart`, `do_POST_reinitialize`;
patroni/utils.py: `cluster_as_json` for the shape of GET /cluster). Patroni answers actions in plain text and
status in JSON; the API server's proxy passes its status codes and bodies through unchanged.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.kube_sim.faults import Faults, MemberFault
from tests.kube_sim.kubelet import is_ready, stage_of
from tests.kube_sim.objects import Profile
from tests.kube_sim.store import Obj, Store
from tests.kube_sim.timing import Speed

PORT = 8008
VERSION = "4.0.4"
SERVER_VERSION = 160004
# Patroni's `maximum_lag_on_failover` default: a candidate further behind does not promote itself.
MAX_LAG_ON_FAILOVER = 1048576
BASE_LSN = 0x5000060
LSN_PER_TIMELINE = 0x1000000
# What Patroni answers by default for a status a fault asks for without a message of its own.
DEFAULT_MESSAGES = {
    400: "Switchover could be performed only from a specific leader",
    412: "switchover is not possible: no good candidates have been found",
    503: "Switchover failed",
}

Answer = tuple[int, str, str]  # (HTTP status, content type, body)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass
class Action:
    """What Patroni's async executor runs on one member (Patroni runs one at a time: `... already in progress`), in
    phases over simulated time: a restart (`restarting`, then `running`, or a crash loop of `starting` and `crashed`
    after `restart failed`), a re-clone (`creating replica`, then `running`, or `stopped` and a new basebackup)."""

    kind: Literal["restart", "reinitialize"]
    phase: str  # Patroni's state of the member while the action runs
    since: float | None = None  # on the controller's clock, set on its first tick
    # A restart's request waits for its outcome, as Patroni's synchronous POST /restart does.
    answer: asyncio.Future[tuple[int, str]] | None = None


@dataclass
class MemberState:
    """What Patroni on one member knows beyond the labels; kept by pod name, so it outlives a recreated pod."""

    lag: int = 0
    tags: dict[str, Any] = field(default_factory=dict)
    pending_restart: bool = False
    timeline_behind: int = 0  # how many timelines this member trails the cluster (it missed a promotion)
    action: Action | None = None
    restarts: int = 0
    basebackups: int = 0  # basebackups started by /reinitialize, failed ones included
    # pg_postmaster_start_time(), which GET /patroni shows as `postmaster_start_time`: a restart or a re-clone sets it.
    started_at: float = field(default_factory=time.time)


@dataclass
class Switchover:
    """A switchover in progress; the request that started it waits for `answer`."""

    leader: str
    candidate: str
    started: float | None = None  # on the controller's clock, set on its first tick
    # Fault: the leader is lost during the switchover; nobody leads for `lost_s`, then `lost_to` does.
    lost_to: str | None = None
    lost_s: float = 0.0
    demoted: bool = False
    answer: asyncio.Future[tuple[int, str]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(frozen=True)
class SwitchoverRecord:
    """One switchover as the cluster lived it: who led, who was asked to, who leads after, on which timeline."""

    namespace: str
    cluster: str
    leader: str
    candidate: str
    new_leader: str
    timeline: int


@dataclass
class ClusterState:
    timeline: int = 1
    paused: bool = False
    synchronous_mode: bool = False
    sync_standby: str | None = None
    switchover: Switchover | None = None
    # Fault for the next switchover: (member that ends up leading or None for the candidate, seconds leaderless)
    lose_leader: tuple[str | None, float] | None = None
    switchover_s: float | None = None  # fault: the next switchover takes this long


class Patroni:
    """Every member's Patroni, by (namespace, StatefulSet): its state, its REST API and its switchover controller."""

    def __init__(self, store: Store, faults: Faults, speed: Speed, profile: Profile) -> None:
        self.store = store
        self.faults = faults
        self.speed = speed
        self.profile = profile
        self.members: dict[tuple[str, str], MemberState] = {}  # (namespace, pod name)
        self.clusters: dict[tuple[str, str], ClusterState] = {}
        self.history: list[SwitchoverRecord] = []
        self.restarts: list[tuple[str, str]] = []  # (namespace, pod) of every POST /restart carried out
        self.reinits: list[tuple[str, str]] = []  # (namespace, pod) of every POST /reinitialize carried out
        self.restart_s: dict[tuple[str, str], float] = {}  # fault: a member's restart takes this long
        self.reclone_s: dict[tuple[str, str], float] = {}  # fault: a member's basebackup takes this long
        self.requests: list[tuple[str, str, str]] = []  # (method, endpoint, pod) of every request Patroni received

    # state

    def member(self, namespace: str, pod: str) -> MemberState:
        return self.members.setdefault((namespace, pod), MemberState())

    def cluster(self, namespace: str, name: str) -> ClusterState:
        return self.clusters.setdefault((namespace, name), ClusterState())

    def _statefulset_of(self, pod: Obj) -> Obj | None:
        ref = next((r for r in pod["metadata"].get("ownerReferences") or [] if r.get("kind") == "StatefulSet"), None)
        return self.store.get("statefulsets", pod["metadata"]["namespace"], ref["name"]) if ref else None

    def _pods(self, namespace: str, cluster: str) -> list[Obj]:
        sts = self.store.get("statefulsets", namespace, cluster)
        if sts is None:
            return []
        uid = sts["metadata"]["uid"]
        pods = self.store.objects("pods", namespace)
        return [p for p in pods if any(r.get("uid") == uid for r in p["metadata"].get("ownerReferences") or [])]

    def leader(self, namespace: str, cluster: str) -> str | None:
        for pod in self._pods(namespace, cluster):
            if self._is_leader(pod):
                return str(pod["metadata"]["name"])
        return None

    def _is_leader(self, pod: Obj) -> bool:
        return not pod["metadata"].get("deletionTimestamp") and self.profile.role_of(pod) in (
            self.profile.primary,
            "master",
            "primary",
        )

    def _state(self, pod: Obj) -> str | None:
        """Patroni's state of the member (None: no Patroni running, so not in the cluster's member list)."""
        stage = stage_of(pod)
        if stage not in ("running", "ready"):
            return None
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        action = self.member(ns, name).action
        if action is not None:
            return action.phase
        role = self.profile.role_of(pod)
        if self._is_leader(pod):
            return "running"
        if not is_ready(pod):
            # A new member is still being cloned; a labelled one that stopped answering its probe is restarting.
            return "creating replica" if role is None else "starting"
        return "streaming" if role is not None else "starting"

    def _timeline(self, namespace: str, cluster: str, pod: Obj) -> int:
        state = self.cluster(namespace, cluster)
        return max(1, state.timeline - self.member(namespace, pod["metadata"]["name"]).timeline_behind)

    def _leader_lsn(self, state: ClusterState) -> int:
        return BASE_LSN + LSN_PER_TIMELINE * (state.timeline - 1)

    def cluster_json(self, namespace: str, cluster: str) -> Obj:
        """GET /cluster, shaped as Patroni's `cluster_as_json`: members sorted by name, `pause` only when paused."""
        state = self.cluster(namespace, cluster)
        leader_lsn = self._leader_lsn(state)
        members = []
        for pod in self._pods(namespace, cluster):
            status = self._state(pod)
            if status is None:
                continue
            name = pod["metadata"]["name"]
            mine = self.member(namespace, name)
            leading = self._is_leader(pod)
            role = "leader" if leading else "replica"
            if not leading and state.synchronous_mode and state.sync_standby == name:
                role = "sync_standby"
            member: Obj = {
                "name": name,
                "role": role,
                "state": status,
                "api_url": f"http://{pod['status'].get('podIP', '127.0.0.1')}:{PORT}/patroni",
                "host": pod["status"].get("podIP", "127.0.0.1"),
                "port": 5432,
                "timeline": self._timeline(namespace, cluster, pod),
            }
            if mine.pending_restart:
                member["pending_restart"] = True
            if mine.tags:
                member["tags"] = dict(mine.tags)
            if not leading:
                if status not in ("streaming", "running"):
                    member |= {"lsn": "unknown", "lag": "unknown"}
                else:
                    member |= {"lsn": format_lsn(leader_lsn - mine.lag), "lag": mine.lag}
            members.append(member)
        body: Obj = {"members": sorted(members, key=lambda m: m["name"])}
        if state.paused:
            body["pause"] = True
        return body

    def patroni_json(self, namespace: str, cluster: str, pod: Obj) -> Obj:
        """GET /patroni: one member's own status (Patroni's `get_postgresql_status`, `_write_status_response`)."""
        state = self.cluster(namespace, cluster)
        name = pod["metadata"]["name"]
        mine = self.member(namespace, name)
        status = self._state(pod) or "stopped"
        leading = self._is_leader(pod)
        lsn = self._leader_lsn(state) - (0 if leading else mine.lag)
        body: Obj = {
            "state": "running" if status == "streaming" else status,
            "role": "primary" if leading else "replica",
        }
        if mine.action is None:  # PostgreSQL answers Patroni's query; while it is down only the two above are known
            body |= {
                # As psycopg hands Patroni the timestamptz and `json.dumps(default=str)` writes it.
                "postmaster_start_time": str(datetime.datetime.fromtimestamp(mine.started_at, datetime.UTC)),
                "server_version": SERVER_VERSION,
                "timeline": self._timeline(namespace, cluster, pod),
                "xlog": {"location": lsn}
                if leading
                else {"received_location": lsn, "replayed_location": lsn, "replayed_timestamp": None, "paused": False},
            }
        if not leading and status == "streaming":
            body["replication_state"] = "streaming"
        if state.synchronous_mode and state.sync_standby == name:
            body["sync_standby"] = True
        if state.paused:
            body["pause"] = True
        if self.leader(namespace, cluster) is None:
            body["cluster_unlocked"] = True
        if mine.tags:
            body["tags"] = dict(mine.tags)
        if mine.pending_restart:
            body["pending_restart"] = True
        body["patroni"] = {"version": VERSION, "scope": cluster, "name": name}
        return body

    # REST API

    def serves(self, pod: Obj) -> bool:
        """Whether Patroni listens on the pod: a member of a StatefulSet whose container runs."""
        return self._statefulset_of(pod) is not None and self._state(pod) is not None

    async def handle(self, method: str, pod: Obj, path: str, raw: bytes) -> Answer:
        """One request to Patroni on `pod` (which `serves`); Patroni's answer."""
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        sts = self._statefulset_of(pod)
        assert sts is not None
        cluster = sts["metadata"]["name"]
        endpoint = path.strip("/").split("/")[0]
        self.requests.append((method, endpoint, name))
        fault = self.faults.take_patroni(method.lower(), endpoint, ns, name)
        if fault is not None:
            message = fault.message or DEFAULT_MESSAGES.get(fault.status, "error")
            return fault.status, "text/html", message
        if method == "GET" and endpoint == "cluster":
            return _json(200, self.cluster_json(ns, cluster))
        if method == "GET" and endpoint in ("patroni", "health", ""):
            return _json(200, self.patroni_json(ns, cluster, pod))
        if method != "POST" or endpoint not in ("switchover", "failover", "restart", "reinitialize"):
            return 501, "text/html", f"Unsupported method ({method!r})"
        try:
            request = json.loads(raw) if raw.strip() else {}
        except ValueError:
            request = None
        if not isinstance(request, dict):
            return 400, "text/html", "Bad Request"
        if endpoint == "restart":
            return await self._restart(ns, cluster, pod, request)
        if endpoint == "reinitialize":
            return self._reinitialize(ns, cluster, pod)
        return await self._switchover(ns, cluster, request)

    def _refusal(self, ns: str, cluster: str, leader: str | None, candidate: str | None) -> tuple[int, str] | None:
        """Patroni's checks before it writes the failover key, in its order, with its words."""
        state = self.cluster(ns, cluster)
        if not leader:
            return 400, "Switchover could be performed only from a specific leader"
        if state.paused and not candidate:
            return 400, "Switchover is possible only to a specific candidate in a paused state"
        if leader == candidate:
            return 400, "Switchover target and source are the same"
        if leader != self.leader(ns, cluster):
            return 412, "leader name does not match"
        pods = {p["metadata"]["name"]: p for p in self._pods(ns, cluster) if self._state(p) is not None}
        if candidate:
            if state.synchronous_mode and state.sync_standby != candidate:
                return 412, "candidate name does not match with sync_standby"
            if candidate not in pods:
                return 412, "candidate does not exists"
            names = [candidate]
        elif state.synchronous_mode:
            names = [n for n in pods if n == state.sync_standby]
            if not names:
                return 412, "switchover is not possible: can not find sync_standby"
        else:
            names = [n for n in pods if n != leader]
            if not names:
                return 412, "switchover is not possible: cluster does not have members except leader"
        # A member qualifies when it runs and may be promoted (Patroni's `failover_limitation`).
        good = [
            n for n in names if self._state(pods[n]) == "streaming" and not self.member(ns, n).tags.get("nofailover")
        ]
        if not good:
            return 412, "switchover is not possible: no good candidates have been found"
        return None

    def _best(self, ns: str, cluster: str, leader: str) -> str:
        pods = [p for p in self._pods(ns, cluster) if self._state(p) == "streaming"]
        names = [str(p["metadata"]["name"]) for p in pods if p["metadata"]["name"] != leader]
        eligible = [n for n in names if not self.member(ns, n).tags.get("nofailover")]
        return min(eligible, key=lambda n: (self.member(ns, n).lag, n))

    async def _switchover(self, ns: str, cluster: str, request: Obj) -> Answer:
        leader, candidate = request.get("leader"), request.get("candidate") or request.get("member")
        state = self.cluster(ns, cluster)
        running = state.switchover
        if running is not None and running.leader == leader and candidate in (None, running.candidate):
            # The failover key is already written for this very switchover: the request waits for the same outcome.
            status, text = await asyncio.shield(running.answer)
            return status, "text/html", text
        refused = self._refusal(ns, cluster, leader, candidate)
        if refused is not None:
            return refused[0], "text/html", refused[1]
        assert isinstance(leader, str)
        chosen = candidate or self._best(ns, cluster, leader)
        switch = Switchover(leader, chosen)
        if state.lose_leader is not None:
            lost_to, switch.lost_s = state.lose_leader
            switch.lost_to = lost_to or chosen
            state.lose_leader = None
        state.switchover = switch
        # Patroni polls the DCS until the leader changes and only then answers; a client that goes away meanwhile
        # changes nothing, the switchover goes on (the controller carries it out).
        status, text = await asyncio.shield(switch.answer)
        return status, "text/html", text

    async def _restart(self, ns: str, cluster: str, pod: Obj, request: Obj) -> Answer:
        """Patroni's `do_POST_restart` and `Ha.restart`: the request's keys checked in turn (400 on a bad one), then
        the conditions (`role`, `restart_pending`: 503), then one action at a time (503 `... already in progress`);
        an immediate restart answers once PostgreSQL is back (200 "restarted successfully") or did not come back
        (503 "restart failed"). Scheduled restarts are not simulated."""
        state = self.cluster(ns, cluster)
        if state.paused and "schedule" in request:
            return 500, "text/html", "Can't schedule restart in the paused state"
        for key, value in request.items():
            if key == "role" and value not in ("primary", "standby_leader", "replica"):
                return 400, "text/html", "PostgreSQL role should be either primary, standby_leader, or replica"
            if key == "timeout" and (not isinstance(value, int | float) or value <= 0):
                return 400, "text/html", "Timeout should be a positive number of seconds"
            if key not in ("role", "timeout", "restart_pending", "postgres_version", "schedule"):
                return 400, "text/html", f"Unknown filter for the scheduled restart: {key}"
        name = pod["metadata"]["name"]
        mine = self.member(ns, name)
        role = request.get("role")
        # Patroni asks only whether `restart_pending` is present, not what it says (`'restart_pending' in ...`).
        if (role is not None and role != ("primary" if self._is_leader(pod) else "replica")) or (
            "restart_pending" in request and not mine.pending_restart
        ):
            return 503, "text/html", "restart conditions are not satisfied"
        if mine.action is not None:
            return 503, "text/html", f"{mine.action.kind} already in progress"
        answer: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        mine.action = Action("restart", "restarting", answer=answer)
        mine.restarts += 1
        self.restarts.append((ns, name))
        # As for a switchover, a client that goes away changes nothing: the restart goes on.
        status, text = await asyncio.shield(answer)
        return status, "text/html", text

    def _reinitialize(self, ns: str, cluster: str, pod: Obj) -> Answer:
        """Patroni's `Ha.reinitialize`: never on the leader nor without one, one action at a time; the re-clone itself
        runs in the background (200 "reinitialize started")."""
        if self.leader(ns, cluster) is None:
            return 503, "text/html", "Cluster has no leader, can not reinitialize"
        if self._is_leader(pod):
            return 503, "text/html", "I am the leader, can not reinitialize"
        name = pod["metadata"]["name"]
        mine = self.member(ns, name)
        if mine.action is not None:
            return 503, "text/html", f"{mine.action.kind} already in progress"
        mine.action = Action("reinitialize", "creating replica")
        mine.basebackups += 1
        self.reinits.append((ns, name))
        return 200, "text/html", "reinitialize started"

    # controller

    def reconcile(self, now: float) -> None:
        """Carry out switchovers, restarts and re-clones over simulated time."""
        for (ns, cluster), state in list(self.clusters.items()):
            if state.switchover is not None:
                self._advance(ns, cluster, state, now)
        for (ns, name), mine in list(self.members.items()):
            action = mine.action
            if action is None:
                continue
            if action.since is None:
                action.since = now
            elapsed = now - action.since
            if action.kind == "restart":
                self._restarting(ns, name, mine, action, elapsed, now)
            else:
                self._recloning(ns, name, mine, action, elapsed, now)

    def _restarting(self, ns: str, name: str, mine: MemberState, action: Action, elapsed: float, now: float) -> None:
        """`restarting` for the sim's restart delay, then back (a new postmaster start time), or, under the
        `restart_crash_loop` fault, "restart failed" and a crash loop of `starting` and `crashed` (Patroni trying to
        start PostgreSQL again on every cycle) until the fault is cleared."""
        crashing = self.faults.member(ns, name) is MemberFault.RESTART_CRASH_LOOP
        if action.phase == "restarting":
            if elapsed < self.restart_s.get((ns, name), self.speed.restart):
                return
            if crashing:
                action.phase, action.since = "restart failed", now
                _answer(action, 503, "restart failed")
                return
        elif crashing:
            if elapsed >= self.speed.crash:
                action.phase, action.since = ("crashed" if action.phase == "starting" else "starting"), now
            return
        mine.action = None
        mine.started_at = time.time()
        mine.pending_restart = False
        mine.lag = self.faults.lag_after_restart.get((ns, name), mine.lag)
        _answer(action, 200, "restarted successfully")

    def _recloning(self, ns: str, name: str, mine: MemberState, action: Action, elapsed: float, now: float) -> None:
        """`creating replica` for the sim's ready delay, then a fresh copy of the leader (no lag, its timeline, a new
        postmaster start time); under the `basebackup_fails` fault, `stopped` (Patroni removed the data directory)
        for the crash period, then another basebackup, for ever (Patroni's `Bootstrap.create_replica`, `Ha.clone`)."""
        if action.phase == "stopped":
            if elapsed >= self.speed.crash:
                action.phase, action.since = "creating replica", now
                mine.basebackups += 1
            return
        if elapsed < self.reclone_s.get((ns, name), self.speed.ready):
            return
        if self.faults.member(ns, name) is MemberFault.BASEBACKUP_FAILS:
            action.phase, action.since = "stopped", now
            return
        mine.action = None
        mine.started_at = time.time()
        mine.lag = 0
        mine.timeline_behind = 0

    def _advance(self, ns: str, cluster: str, state: ClusterState, now: float) -> None:
        switch = state.switchover
        assert switch is not None
        if switch.started is None:
            switch.started = now
        took = state.switchover_s if state.switchover_s is not None else self.speed.switchover
        elapsed = now - switch.started
        if elapsed < took:
            return
        if not switch.demoted:
            # The leader demotes: Patroni removes its role label while it restarts as a replica.
            self._relabel(ns, switch.leader, None)
            switch.demoted = True
            if self.member(ns, switch.candidate).lag > MAX_LAG_ON_FAILOVER and switch.lost_to is None:
                # The candidate refuses to promote itself with that much lag; the old leader takes the lock back.
                self._relabel(ns, switch.leader, self.profile.primary)
                self._finish(state, 503, "Switchover failed")
                return
        if elapsed < took + switch.lost_s:
            return
        new_leader = switch.lost_to or switch.candidate
        self._relabel(ns, new_leader, self.profile.primary)
        state.timeline += 1
        self.member(ns, new_leader).timeline_behind = 0  # the promoted member starts the new timeline
        self.history.append(SwitchoverRecord(ns, cluster, switch.leader, switch.candidate, new_leader, state.timeline))
        state.switchover_s = None
        if new_leader == switch.candidate:
            self._finish(state, 200, f'Successfully switched over to "{new_leader}"')
        else:
            self._finish(state, 200, f'Switched over to "{new_leader}" instead of "{switch.candidate}"')

    def _finish(self, state: ClusterState, status: int, text: str) -> None:
        switch, state.switchover = state.switchover, None
        if switch is not None and not switch.answer.done():
            switch.answer.set_result((status, text))

    def _relabel(self, ns: str, name: str, role: str | None) -> None:
        pod = self.store.get("pods", ns, name)
        if pod is not None:
            self.profile.set_role(pod, role)
            self.store.update("pods", pod)

    def promoted(self, ns: str, cluster: str) -> None:
        """A failover outside Patroni's API (`KubeSim.change_primary`): the new leader starts a new timeline."""
        self.cluster(ns, cluster).timeline += 1

    def stop(self) -> None:
        """Answer any request still waiting, so the server can shut down."""
        for state in self.clusters.values():
            self._finish(state, 503, "Switchover status unknown")
        for mine in self.members.values():
            if mine.action is not None:
                _answer(mine.action, 503, "restart failed")


def _answer(action: Action, status: int, text: str) -> None:
    if action.answer is not None and not action.answer.done():
        action.answer.set_result((status, text))


def _json(status: int, body: Obj) -> Answer:
    return status, "application/json", json.dumps(body)
