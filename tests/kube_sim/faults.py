"""Fault injection: the ways a real cluster misbehaves that the pg-rebuild job must notice and report.

Request faults (an HTTP error, latency, a cut watch, an answer of Patroni's) are consulted by the API layer before
it touches any state, so a failed delete really deleted nothing. Pod and PVC faults are consulted by the controllers
on every tick and are keyed by object name, so they also hit the pod the StatefulSet recreates under the same name.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, TypeVar


class Behaviour(enum.StrEnum):
    """What the kubelet/scheduler do to a pod of that name."""

    NOT_READY = "not_ready"  # readiness probe fails: Ready=False while the container runs
    CRASH_LOOP = "crash_loop"  # waiting CrashLoopBackOff, restartCount climbing
    IMAGE_PULL = "image_pull"  # alternates ErrImagePull and ImagePullBackOff
    CONFIG_ERROR = "config_error"  # CreateContainerConfigError (e.g. a missing secret key)
    UNSCHEDULABLE = "unschedulable"  # PodScheduled=False, reason Unschedulable


class MemberFault(enum.StrEnum):
    """What Patroni's actions do on a member of that name."""

    RESTART_CRASH_LOOP = "restart_crash_loop"  # POST /restart: "restart failed", then `starting`/`crashed` for ever
    BASEBACKUP_FAILS = "basebackup_fails"  # POST /reinitialize: every basebackup fails, Patroni tries again


@dataclass
class RequestRule:
    """Matches requests by verb (get, list, watch, delete), resource (plural), namespace and name; None = any."""

    verb: str | None = None
    resource: str | None = None
    namespace: str | None = None
    name: str | None = None
    times: int | None = None  # None: for ever
    hits: int = 0

    def matches(self, verb: str, resource: str, namespace: str, name: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        wanted = ((self.verb, verb), (self.resource, resource), (self.namespace, namespace), (self.name, name))
        return all(want is None or want == got for want, got in wanted)


@dataclass
class HttpFault(RequestRule):
    status: int = 500
    retry_after: int | None = None
    message: str | None = None


@dataclass
class PatroniFault(RequestRule):
    """Patroni itself answers `status` (with `message`, else its usual words for it): verb is the HTTP method in
    lower case, resource the endpoint (`switchover`, `cluster`, ...), name the member's pod."""

    status: int = 503
    message: str | None = None


@dataclass
class Latency(RequestRule):
    seconds: float = 0.0


@dataclass
class WatchCut(RequestRule):
    after_events: int = 0  # the stream ends after delivering this many events


@dataclass
class Faults:
    http: list[HttpFault] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    watch_cuts: list[WatchCut] = field(default_factory=list)
    pods: dict[tuple[str, str], Behaviour] = field(default_factory=dict)
    stuck_pvcs: set[tuple[str, str]] = field(default_factory=set)
    rollouts: set[tuple[str, str]] = field(default_factory=set)  # StatefulSets whose update never progresses
    patroni: list[PatroniFault] = field(default_factory=list)
    members: dict[tuple[str, str], MemberFault] = field(default_factory=dict)
    lag_after_restart: dict[tuple[str, str], int] = field(default_factory=dict)  # bytes a member trails once back

    def clear(self) -> None:
        self.http.clear()
        self.patroni.clear()
        self.members.clear()
        self.lag_after_restart.clear()
        self.latency.clear()
        self.watch_cuts.clear()
        self.pods.clear()
        self.stuck_pvcs.clear()
        self.rollouts.clear()

    def add(self, rule: HttpFault | Latency | WatchCut) -> None:
        if isinstance(rule, HttpFault):
            self.http.append(rule)
        elif isinstance(rule, Latency):
            self.latency.append(rule)
        else:
            self.watch_cuts.append(rule)

    def take_http(self, verb: str, resource: str, namespace: str, name: str) -> HttpFault | None:
        return _take(self.http, verb, resource, namespace, name)

    def take_patroni(self, verb: str, endpoint: str, namespace: str, name: str) -> PatroniFault | None:
        return _take(self.patroni, verb, endpoint, namespace, name)

    def take_latency(self, verb: str, resource: str, namespace: str, name: str) -> float:
        total = 0.0
        for rule in self.latency:
            if rule.matches(verb, resource, namespace, name):
                rule.hits += 1
                total += rule.seconds
        return total

    def take_watch_cut(self, resource: str, namespace: str) -> int | None:
        for rule in self.watch_cuts:
            if rule.matches("watch", resource, namespace, ""):
                rule.hits += 1
                return rule.after_events
        return None

    def pod_behaviour(self, namespace: str, name: str) -> Behaviour | None:
        return self.pods.get((namespace, name))

    def member(self, namespace: str, name: str) -> MemberFault | None:
        return self.members.get((namespace, name))

    def summary(self) -> dict[str, Any]:
        return {
            "http": [vars(f) for f in self.http],
            "latency": [vars(f) for f in self.latency],
            "watchCuts": [vars(f) for f in self.watch_cuts],
            "pods": {f"{ns}/{name}": str(b) for (ns, name), b in self.pods.items()},
            "stuckPvcs": sorted(f"{ns}/{name}" for ns, name in self.stuck_pvcs),
            "rollouts": sorted(f"{ns}/{name}" for ns, name in self.rollouts),
            "patroni": [vars(f) for f in self.patroni],
            "members": {f"{ns}/{name}": str(f) for (ns, name), f in self.members.items()},
            "lagAfterRestart": {f"{ns}/{name}": lag for (ns, name), lag in self.lag_after_restart.items()},
        }


R = TypeVar("R", bound=RequestRule)


def _take(rules: list[R], verb: str, resource: str, namespace: str, name: str) -> R | None:
    """The first rule that matches, counted as hit."""
    for rule in rules:
        if rule.matches(verb, resource, namespace, name):
            rule.hits += 1
            return rule
    return None


def _rule_fields(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "verb": spec.get("verb"),
        "resource": spec.get("resource"),
        "namespace": spec.get("namespace"),
        "name": spec.get("name"),
        "times": spec.get("times"),
    }


def parse_request_fault(spec: dict[str, Any]) -> HttpFault | Latency | WatchCut:
    """Build a request rule from the admin endpoint's JSON (camelCase, like the Kubernetes API)."""
    kind = spec.get("kind")
    if kind == "http":
        return HttpFault(
            **_rule_fields(spec),
            status=int(spec.get("status", 500)),
            retry_after=spec.get("retryAfter"),
            message=spec.get("message"),
        )
    if kind == "latency":
        return Latency(**_rule_fields(spec), seconds=float(spec["seconds"]))
    if kind == "watch_cut":
        fields = _rule_fields(spec) | {"verb": "watch", "name": None}
        return WatchCut(**fields, after_events=int(spec.get("afterEvents", 0)))
    raise ValueError(f"unknown request fault kind: {kind!r}")
