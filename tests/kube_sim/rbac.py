"""Role-based access control for the simulated cluster, as kube-apiserver does it, so that the tests run the job
types under the Role the project ships (deploy/worker-rbac.yaml) and a call it does not grant fails them.

A request is turned into the attributes the API server authorizes (its RequestInfo): the verb from the HTTP method
(GET one object `get`, GET a collection `list`, or `watch` with `?watch=`, POST `create`, PUT `update`, PATCH
`patch`, DELETE `delete`, DELETE a collection `deletecollection`), the API group, namespace, resource, subresource
(`pods/log`) and name. Every request is made as one user, the service account of the bindings (the sim checks no
token); it is allowed when a rule of a Role or ClusterRole bound to that user in the request's namespace (by a
RoleBinding) or everywhere (by a ClusterRoleBinding) matches, as RBAC matches rules. Otherwise the answer is the
API server's 403 `Status`: `pods "x" is forbidden: User "system:serviceaccount:ns:sa" cannot delete resource
"pods" in API group "" in the namespace "ns"`. The sim's own admin API (`/_sim/...`) is never authorized.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import yaml
from starlette.types import ASGIApp, Receive, Scope, Send

# The Role the project ships for its workers.
SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "worker-rbac.yaml"

METHOD_VERBS = {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
# Paths every authenticated user may read (the default binding of `system:public-info-viewer`).
PUBLIC_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/version", "/version/"})
# A namespace's own subresources: `/api/v1/namespaces/x/status` is the namespace's, not a resource named `status`.
NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})


@dataclass(frozen=True)
class Attributes:
    """What the API server authorizes of a request."""

    verb: str
    path: str
    resource_request: bool = False
    api_group: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""

    @property
    def grant(self) -> tuple[str, str, str]:
        """(API group, resource[/subresource], verb): what a rule has to name to allow this request."""
        resource = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return self.api_group, resource, self.verb


def _watching(query: dict[str, list[str]]) -> bool:
    values = query.get("watch") or [""]
    return "watch" in query and values[0].lower() not in ("false", "0")


def _name_from_field_selector(query: dict[str, list[str]]) -> str:
    """`fieldSelector=metadata.name=x` names the object of a list or watch, for rules with resourceNames."""
    for term in (query.get("fieldSelector") or [""])[0].split(","):
        key, sep, value = term.partition("=")
        if sep and key.strip() == "metadata.name" and not value.startswith("="):
            return value.strip()
    return ""


def attributes(method: str, path: str, query_string: str = "") -> Attributes:
    """A request's attributes, parsed as the API server parses them (`/api/v1/...` is the core group,
    `/apis/GROUP/VERSION/...` the others, anything else a non-resource path)."""
    method = method.upper()
    parts = [p for p in path.strip("/").split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return Attributes(verb=method.lower(), path=path)
    verb = METHOD_VERBS.get(method, method.lower())
    if rest[0] == "watch":  # the old /watch/ prefix
        verb, rest = "watch", rest[1:]
    namespace = ""
    if rest and rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    query = parse_qs(query_string, keep_blank_values=True)
    if not name and verb == "get":
        verb = "watch" if _watching(query) else "list"
        name = _name_from_field_selector(query)
    if not name and verb == "delete":
        verb = "deletecollection"
    return Attributes(verb, path, True, group, namespace, resource, subresource, name)


@dataclass(frozen=True)
class Rule:
    api_groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    resource_names: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Rule:
        return cls(
            frozenset(raw.get("apiGroups") or ()),
            frozenset(raw.get("resources") or ()),
            frozenset(raw.get("verbs") or ()),
            frozenset(raw.get("resourceNames") or ()),
        )

    def allows(self, request: Attributes) -> bool:
        resource = f"{request.resource}/{request.subresource}" if request.subresource else request.resource
        resource_ok = bool({"*", resource} & self.resources) or (
            bool(request.subresource) and f"*/{request.subresource}" in self.resources
        )
        return (
            bool({"*", request.verb} & self.verbs)
            and bool({"*", request.api_group} & self.api_groups)
            and resource_ok
            and (not self.resource_names or request.name in self.resource_names)
        )

    def grants(self) -> set[tuple[str, str, str]]:
        """Every (API group, resource, verb) the rule names, as `Attributes.grant` says them."""
        return {(g, r, v) for g in self.api_groups for r in self.resources for v in self.verbs}


@dataclass(frozen=True)
class Binding:
    namespace: str | None  # None: a ClusterRoleBinding
    role_kind: str
    role_name: str
    users: frozenset[str]


def service_account_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


@dataclass
class Rbac:
    """Roles, ClusterRoles and their bindings, as read from manifests; `user` is who every request is made as."""

    roles: dict[tuple[str, str], tuple[Rule, ...]]  # (namespace, name) -> rules
    cluster_roles: dict[str, tuple[Rule, ...]]
    bindings: list[Binding]
    user: str
    denied: list[str] = field(default_factory=list)  # the message of every request refused, in order
    allowed: set[tuple[str, str, str]] = field(default_factory=set)  # what the allowed requests used (`grant`)

    @classmethod
    def from_manifests(cls, documents: Iterable[Any], user: str | None = None) -> Rbac:
        roles: dict[tuple[str, str], tuple[Rule, ...]] = {}
        cluster_roles: dict[str, tuple[Rule, ...]] = {}
        bindings: list[Binding] = []
        for doc in documents:
            if not isinstance(doc, dict):
                continue
            kind, meta = doc.get("kind"), doc.get("metadata") or {}
            rules = tuple(Rule.parse(r) for r in doc.get("rules") or ())
            if kind == "Role":
                roles[(meta["namespace"], meta["name"])] = rules
            elif kind == "ClusterRole":
                cluster_roles[meta["name"]] = rules
            elif kind in ("RoleBinding", "ClusterRoleBinding"):
                users = frozenset(
                    service_account_user(s["namespace"], s["name"]) if s["kind"] == "ServiceAccount" else s["name"]
                    for s in doc.get("subjects") or ()
                )
                namespace = meta["namespace"] if kind == "RoleBinding" else None
                bindings.append(Binding(namespace, doc["roleRef"]["kind"], doc["roleRef"]["name"], users))
        if user is None:
            accounts = {u for b in bindings for u in b.users if u.startswith("system:serviceaccount:")}
            if len(accounts) != 1:
                raise ValueError(f"name the user: the bindings name {sorted(accounts) or 'no service account'}")
            user = accounts.pop()
        return cls(roles, cluster_roles, bindings, user)

    @classmethod
    def load(cls, path: Path = SHIPPED, user: str | None = None) -> Rbac:
        with path.open(encoding="utf-8") as file:
            return cls.from_manifests(yaml.safe_load_all(file), user)

    def rules_for(self, namespace: str) -> list[Rule]:
        """The rules that apply to the user in `namespace` ("" for cluster-scoped requests)."""
        rules: list[Rule] = []
        for binding in self.bindings:
            if self.user not in binding.users or binding.namespace not in (None, namespace):
                continue
            if binding.namespace is None or binding.role_kind == "ClusterRole":
                rules.extend(self.cluster_roles.get(binding.role_name, ()))
            else:
                rules.extend(self.roles.get((binding.namespace, binding.role_name), ()))
        return rules

    def granted(self) -> set[tuple[str, str, str]]:
        """Everything any bound role grants, as (API group, resource, verb)."""
        return {
            g for ns in {b.namespace or "" for b in self.bindings} for rule in self.rules_for(ns) for g in rule.grants()
        }

    def authorize(self, request: Attributes) -> bool:
        if not request.resource_request:
            return request.path in PUBLIC_PATHS
        allowed = any(rule.allows(request) for rule in self.rules_for(request.namespace))
        if allowed:
            self.allowed.add(request.grant)
        return allowed

    def forbidden(self, request: Attributes) -> dict[str, Any]:
        """The API server's 403 Status for `request`."""
        if not request.resource_request:
            reason = f'User "{self.user}" cannot {request.verb} path "{request.path}"'
            return _status(f"forbidden: {reason}", {})
        resource = f"{request.resource}/{request.subresource}" if request.subresource else request.resource
        where = f'in the namespace "{request.namespace}"' if request.namespace else "at the cluster scope"
        reason = (
            f'User "{self.user}" cannot {request.verb} resource "{resource}" in API group "{request.api_group}" {where}'
        )
        qualified = f"{request.resource}.{request.api_group}" if request.api_group else request.resource
        subject = f'{qualified} "{request.name}"' if request.name else qualified
        details = {"name": request.name, "group": request.api_group, "kind": request.resource}
        return _status(f"{subject} is forbidden: {reason}", {k: v for k, v in details.items() if v})


def _status(message: str, details: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
    body |= {"message": message, "reason": "Forbidden", "details": details, "code": 403}
    return body


class Authorizing:
    """ASGI middleware in front of the sim's API: every request is authorized before any route, fault or state."""

    def __init__(self, app: ASGIApp, rbac: Rbac) -> None:
        self.app = app
        self.rbac = rbac

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_sim/"):
            await self.app(scope, receive, send)
            return
        request = attributes(scope["method"], scope["path"], scope["query_string"].decode("latin-1"))
        if self.rbac.authorize(request):
            await self.app(scope, receive, send)
            return
        body = self.rbac.forbidden(request)
        self.rbac.denied.append(body["message"])
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
