"""Patroni's REST API through the Kubernetes API's pod proxy: what every pg-* job type asks the HA layer.

    patroni = Patroni(kube, namespace)
    view = await patroni.cluster(["pg-0", "pg-1", "pg-2"])  # GET /cluster from the first member that answers
    said = await patroni.switchover("pg-0", leader="pg-0", candidate="pg-1", timeout_s=60)
    said = await patroni.restart("pg-1", pending_only=False, timeout_s=300)  # answers once PostgreSQL is back
    said = await patroni.reinitialize("pg-1")  # answers at once; the re-clone runs in the background

What Patroni's answers mean, from its REST API documentation ("Switchover and failover endpoints") and its code
(patroni/api.py, `do_POST_failover`): 2xx is done, with Patroni's own sentence; 412 ("leader name does not match",
"candidate does not exists", "... no good candidates have been found") and 400 ("Switchover could be performed only
from a specific leader") are refusals that asking again will not change: `PatroniRefused`, which fails the step at
once with Patroni's words; 503 ("Switchover failed", "failed to write failover key into DCS") is transient: a
`TransientError`, retried with backoff by the engine (a step) or by `wait_until` (a wait). The API server's own
errors (pod missing, `pods/proxy` not granted) surface as from any other Kubernetes call (`Kube.proxy`).

`/restart` and `/reinitialize` (its REST API documentation, "Restart endpoint" and "Reinitialize endpoint"; its
code: `do_POST_restart`, `do_POST_reinitialize`, `Ha.restart`, `Ha.reinitialize`) answer 400 for a malformed request
and 503 for everything else that did not happen: "restart conditions are not satisfied", "restart failed",
"I am the leader, can not reinitialize", "<action> already in progress". What each means to a job is the job's to
say (`PatroniUnavailable.answer`): a member already restarting is not a reason to ask again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jobs.pgkube.kube import Kube, KubeError, ProxyAnswer
from service.jobtypes import TransientError

PORT = 8008  # Patroni's REST API (`restapi.listen`) in every operator's pods
LEADER_ROLES = frozenset({"leader", "standby_leader"})
SYNC_ROLES = frozenset({"sync_standby", "quorum_standby"})


class PatroniRefused(Exception):
    """Patroni refused the request (HTTP 400 or 412): the cluster is not in a state where it would do it."""


class PatroniUnavailable(TransientError):
    """Patroni could not do it now (HTTP 5xx); `answer` is what it said ("Switchover failed", ...)."""

    def __init__(self, message: str, answer: str) -> None:
        super().__init__(message)
        self.answer = answer


@dataclass(frozen=True)
class Member:
    """One member as GET /cluster shows it (Patroni's `cluster_as_json`)."""

    name: str
    role: str  # leader, standby_leader, sync_standby, quorum_standby, replica
    state: str  # running, streaming, starting, creating replica, stopped, ...
    timeline: int | None
    lag: int | None  # bytes behind the leader; None on the leader and while unknown
    tags: dict[str, Any] = field(default_factory=dict)
    pending_restart: bool = False

    @property
    def leads(self) -> bool:
        return self.role in LEADER_ROLES

    @property
    def nofailover(self) -> bool:
        return bool(self.tags.get("nofailover"))

    def describe(self) -> str:
        """`pg-1 (streaming, timeline 2, lag 0 B)`."""
        lag = "" if self.leads else f", lag {'unknown' if self.lag is None else f'{self.lag} B'}"
        return f"{self.name} ({self.state}, timeline {self.timeline if self.timeline is not None else '?'}{lag})"


@dataclass(frozen=True)
class ClusterView:
    """GET /cluster: the members Patroni knows (a member whose Patroni is down is not listed), and the pause."""

    members: tuple[Member, ...]
    paused: bool
    via: str  # the pod that answered

    @property
    def leaders(self) -> list[Member]:
        return [m for m in self.members if m.leads]

    @property
    def sync_standbys(self) -> list[Member]:
        """The synchronous standbys; empty unless the cluster runs in synchronous mode."""
        return [m for m in self.members if m.role in SYNC_ROLES]

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)


@dataclass(frozen=True)
class MemberStatus:
    """GET /patroni on one member (Patroni's `get_postgresql_status`): its own view, with what only it knows."""

    name: str
    state: str  # running, restarting, starting, creating replica, restart failed, crashed, stopped, ...
    role: str  # primary, replica, standby_leader
    # pg_postmaster_start_time(), as Patroni prints it; None while PostgreSQL does not answer. It changes with every
    # start of PostgreSQL, which is how a job knows that a restart or a re-clone it asked for has happened.
    started: str | None
    pending_restart: bool


def _member(raw: dict[str, Any]) -> Member:
    timeline, lag = raw.get("timeline"), raw.get("lag")
    return Member(
        name=str(raw.get("name", "")),
        role=str(raw.get("role", "")),
        state=str(raw.get("state", "")),
        timeline=timeline if isinstance(timeline, int) else None,
        lag=lag if isinstance(lag, int) else None,
        tags=dict(raw.get("tags") or {}),
        pending_restart=bool(raw.get("pending_restart")),
    )


def _outcome(action: str, pod: str, answer: ProxyAnswer) -> str:
    text = answer.text.strip() or f"HTTP {answer.status}"
    if 200 <= answer.status < 300:
        return text
    if answer.status >= 500:
        raise PatroniUnavailable(f"Patroni on {pod} could not {action} now (HTTP {answer.status}): {text}", text)
    raise PatroniRefused(f"Patroni refused the {action} (HTTP {answer.status}): {text}")


class Patroni:
    """The Patroni REST API of one namespace's members, through `kube`'s pod proxy."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace

    async def get(self, pod: str, path: str) -> Any:
        """GET `path` of Patroni on `pod`, parsed from JSON."""
        answer = await self.kube.proxy(self.namespace, pod, PORT, path)
        text = _outcome(f"answer GET /{path}", pod, answer)
        try:
            return json.loads(text)
        except ValueError:
            raise TransientError(f"Patroni on {pod} answered GET /{path} with no JSON: {text[:200]}") from None

    async def cluster(self, via: Sequence[str]) -> ClusterView:
        """GET /cluster from the first of `via` whose Patroni answers: every member serves the same view (from the
        DCS), and a member being restarted or re-cloned has no Patroni to ask."""
        if not via:
            raise PatroniRefused("no member to ask Patroni about the cluster")
        failure: Exception | None = None
        for pod in via:
            try:
                raw = await self.get(pod, "cluster")
            except (TransientError, KubeError) as exc:
                failure = exc
                continue
            members = tuple(_member(m) for m in raw.get("members") or [] if isinstance(m, dict))
            return ClusterView(members, bool(raw.get("pause")), pod)
        assert failure is not None
        raise failure

    async def status(self, pod: str) -> MemberStatus:
        """GET /patroni on `pod`."""
        raw = await self.get(pod, "patroni")
        started = raw.get("postmaster_start_time")
        return MemberStatus(
            name=pod,
            state=str(raw.get("state", "")),
            role=str(raw.get("role", "")),
            started=str(started) if started else None,
            pending_restart=bool(raw.get("pending_restart")),
        )

    async def post(self, pod: str, endpoint: str, body: dict[str, Any], timeout_s: float | None = None) -> str:
        """POST `body` to `endpoint` of Patroni on `pod`; Patroni's answer on success (see the module for errors)."""
        answer = await self.kube.proxy(self.namespace, pod, PORT, endpoint, body=body, timeout_s=timeout_s)
        return _outcome(endpoint, pod, answer)

    async def switchover(self, pod: str, *, leader: str, candidate: str, timeout_s: float) -> str:
        """Ask Patroni (on `pod`) to move the leadership from `leader` to `candidate`. Patroni answers once the new
        leader holds the lock (it polls for up to ~30 s), hence the call's own `timeout_s`. Naming the leader makes
        a late duplicate harmless: once another member leads, Patroni answers 412 "leader name does not match"."""
        return await self.post(pod, "switchover", {"leader": leader, "candidate": candidate}, timeout_s)

    async def restart(self, pod: str, *, pending_only: bool, timeout_s: float) -> str:
        """Restart PostgreSQL on `pod`, now. Patroni answers once it is back ("restarted successfully") or gave up
        ("restart failed", 503), hence `timeout_s`. `pending_only`: only if Patroni flags it `pending_restart` (503
        "restart conditions are not satisfied" otherwise)."""
        return await self.post(pod, "restart", {"restart_pending": True} if pending_only else {}, timeout_s)

    async def reinitialize(self, pod: str) -> str:
        """Re-clone the replica `pod` from the leader, in place (its data directory wiped, its volume kept). Patroni
        answers as soon as the re-clone has begun ("reinitialize started")."""
        return await self.post(pod, "reinitialize", {})
