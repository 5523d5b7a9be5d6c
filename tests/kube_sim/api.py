"""The REST surface: the subset of kube-apiserver that the pg-rebuild job calls, plus a small admin API.

Paths, query parameters and error bodies follow Kubernetes closely enough that kubernetes_asyncio cannot tell
the difference: `Status` objects for every error, `watch=True|true|1` streams of JSON lines, uid preconditions
on delete. Request faults are applied first, before any state is read or changed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.kube_sim.cnpg import API_VERSION as CNPG_API_VERSION
from tests.kube_sim.cnpg import PLURAL as CNPG_CLUSTERS
from tests.kube_sim.faults import Faults, HttpFault
from tests.kube_sim.patroni import PORT, Patroni
from tests.kube_sim.store import Event, Gone, Obj, Selector, SelectorError, Store

# The API server picks a random 30-60 minute timeout when the client sets none.
DEFAULT_WATCH_TIMEOUT = 1800.0

REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclass(frozen=True)
class Kind:
    resource: str
    kind: str
    api_version: str
    namespaced: bool = True

    @property
    def qualified(self) -> str:
        """`pods`, or `statefulsets.apps` for a non-core group, as in API server messages."""
        group = self.api_version.rpartition("/")[0]
        return f"{self.resource}.{group}" if group else self.resource

    def details(self, name: str) -> Obj:
        group = self.api_version.rpartition("/")[0]
        return {"name": name, "kind": self.resource} | ({"group": group} if group else {})


KINDS = {
    ("v1", "pods"): Kind("pods", "Pod", "v1"),
    ("v1", "persistentvolumeclaims"): Kind("persistentvolumeclaims", "PersistentVolumeClaim", "v1"),
    ("v1", "namespaces"): Kind("namespaces", "Namespace", "v1", namespaced=False),
    ("apps/v1", "statefulsets"): Kind("statefulsets", "StatefulSet", "apps/v1"),
    # A custom resource, served as the API server serves a CRD's objects (kubernetes-asyncio's CustomObjectsApi).
    (CNPG_API_VERSION, CNPG_CLUSTERS): Kind(CNPG_CLUSTERS, "Cluster", CNPG_API_VERSION),
}
MERGE_PATCH = "application/merge-patch+json"


def status_body(code: int, message: str, details: Obj | None = None) -> Obj:
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": REASONS.get(code, "Unknown"),
        "details": details or {},
        "code": code,
    }
    if not details:
        del body["details"]
    return body


def status_response(
    code: int, message: str, details: Obj | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(status_body(code, message, details), status_code=code, headers=headers)


def fault_response(fault: HttpFault, kind: Kind, name: str) -> JSONResponse:
    headers: dict[str, str] = {}
    details = kind.details(name) if name else {}
    if fault.retry_after is not None:
        headers["Retry-After"] = str(fault.retry_after)
        details["retryAfterSeconds"] = fault.retry_after
    defaults = {
        409: f'Operation cannot be fulfilled on {kind.qualified} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        429: "Too many requests, please try again later.",
        500: "Internal error occurred: injected by kube-sim",
        503: "The server is currently unable to handle the request",
    }
    message = fault.message or defaults.get(fault.status, f"injected HTTP {fault.status}")
    return status_response(fault.status, message, details, headers)


def not_found(kind: Kind, name: str) -> JSONResponse:
    return status_response(404, f'{kind.qualified} "{name}" not found', kind.details(name))


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _without(patch: Obj, key: str) -> Obj:
    return {k: v for k, v in patch.items() if k != key}


def _line(event_type: str, obj: Obj) -> bytes:
    return (json.dumps({"type": event_type, "object": obj}, separators=(",", ":")) + "\n").encode()


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone away; a request body (empty for a GET) may arrive first."""
    while (await receive())["type"] != "http.disconnect":
        pass


class WatchStream:
    """A raw ASGI response, so that a client going away is noticed even when no event is due."""

    def __init__(self, store: Store, queue: asyncio.Queue[Event | None] | None, first: list[bytes]) -> None:
        self.store = store
        self.queue = queue
        self.first = first
        self.accept: Callable[[Event], bool] = lambda _: False
        self.timeout = DEFAULT_WATCH_TIMEOUT
        self.cut_after: int | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        self.store.watching += 1
        try:
            await self._pump(receive, send)
        finally:
            self.store.watching -= 1
            if self.queue is not None:
                self.store.unsubscribe(self.queue)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _pump(self, receive: Receive, send: Send) -> None:
        sent = 0
        for line in self.first:
            if self.cut_after is not None and sent >= self.cut_after:
                return
            await send({"type": "http.response.body", "body": line, "more_body": True})
            sent += 1
        if self.queue is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        disconnect = asyncio.ensure_future(_disconnected(receive))
        try:
            while self.cut_after is None or sent < self.cut_after:
                get = asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait(
                    {get, disconnect}, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
                )
                if get not in done:
                    get.cancel()
                    return  # timeoutSeconds reached, or the client went away
                event = get.result()
                if event is None:
                    return  # cut by the sim
                if self.accept(event):
                    await send({"type": "http.response.body", "body": _line(event.type, event.obj), "more_body": True})
                    sent += 1
        finally:
            disconnect.cancel()


class KubeApi:
    def __init__(self, store: Store, faults: Faults, patroni: Patroni, admin: Callable[[Obj], Obj]) -> None:
        self.store = store
        self.faults = faults
        self.patroni = patroni
        self.admin = admin

    def routes(self) -> list[Route]:
        return [
            Route("/version", self.version),
            Route("/_sim/state", self.state),
            Route("/_sim/faults", self.fault, methods=["POST", "DELETE"]),
            Route("/api/v1/{resource}", self.collection),
            Route("/api/v1/namespaces/{name}", self.namespace),
            Route("/api/v1/namespaces/{namespace}/{resource}", self.collection),
            Route("/api/v1/namespaces/{namespace}/{resource}/{name}", self.item, methods=["GET", "DELETE"]),
            # The pod proxy, as kubernetes-asyncio's connect_*_namespaced_pod_proxy_with_path call it: `{name}` is
            # `pod` or `pod:port`.
            Route("/api/v1/namespaces/{namespace}/pods/{name}/proxy/{path:path}", self.proxy, methods=["GET", "POST"]),
            Route("/apis/apps/v1/{resource}", self.collection),
            Route("/apis/apps/v1/namespaces/{namespace}/{resource}", self.collection),
            Route("/apis/apps/v1/namespaces/{namespace}/{resource}/{name}", self.item, methods=["GET", "DELETE"]),
            Route(f"/apis/{CNPG_API_VERSION}/{{resource}}", self.collection),
            Route(f"/apis/{CNPG_API_VERSION}/namespaces/{{namespace}}/{{resource}}", self.collection),
            Route(
                f"/apis/{CNPG_API_VERSION}/namespaces/{{namespace}}/{{resource}}/{{name}}",
                self.item,
                methods=["GET", "PATCH"],
            ),
            Route(
                f"/apis/{CNPG_API_VERSION}/namespaces/{{namespace}}/{{resource}}/{{name}}/status",
                self.status,
                methods=["GET", "PATCH"],
            ),
        ]

    def app(self) -> Starlette:
        return Starlette(routes=self.routes())

    @staticmethod
    def _kind(request: Request) -> Kind | None:
        """`/api/v1/...` is the core group, `/apis/GROUP/VERSION/...` the others."""
        parts = request.url.path.split("/")
        api_version = "v1" if parts[1] == "api" else f"{parts[2]}/{parts[3]}"
        return KINDS.get((api_version, request.path_params["resource"]))

    async def _faults(self, verb: str, kind: Kind, namespace: str, name: str) -> Response | None:
        delay = self.faults.take_latency(verb, kind.resource, namespace, name)
        if delay:
            await asyncio.sleep(delay)
        fault = self.faults.take_http(verb, kind.resource, namespace, name)
        return fault_response(fault, kind, name) if fault else None

    async def _target(self, verb: str, kind: Kind, faulted: Kind, namespace: str, name: str) -> Obj | Response:
        """The object a request acts on, once the request faults for `faulted` (the kind, or its subresource) have
        had their say; else the response that ends the request (the fault's, or a 404)."""
        failed = await self._faults(verb, faulted, namespace, name)
        if failed:
            return failed
        obj = self.store.get(kind.resource, namespace, name)
        return obj if obj is not None else not_found(kind, name)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"major": "1", "minor": "31", "gitVersion": "v1.31.0-kube-sim", "platform": "linux/amd64"})

    async def collection(self, request: Request) -> Response | WatchStream:
        kind = self._kind(request)
        if kind is None:
            return status_response(404, "the server could not find the requested resource")
        namespace = request.path_params.get("namespace")
        params = request.query_params
        watching = params.get("watch", "").lower() in ("true", "1")
        failed = await self._faults("watch" if watching else "list", kind, namespace or "", "")
        if failed:
            return failed
        try:
            selector = Selector.parse(params.get("labelSelector"), params.get("fieldSelector"))
        except SelectorError as exc:
            return status_response(400, str(exc))
        if watching:
            return self._watch(kind, namespace, selector, params.get("resourceVersion"), params.get("timeoutSeconds"))
        items = self.store.objects(kind.resource, namespace, selector)
        return JSONResponse(
            {
                "apiVersion": kind.api_version,
                "kind": f"{kind.kind}List",
                "metadata": {"resourceVersion": str(self.store.rv)},
                "items": items,
            }
        )

    def _watch(
        self, kind: Kind, namespace: str | None, selector: Selector, rv: str | None, timeout: str | None
    ) -> WatchStream:
        since = int(rv) if rv and rv != "0" else None
        try:
            backlog, queue = self.store.subscribe(since)
        except Gone as exc:
            return WatchStream(self.store, None, [_line("ERROR", status_body(410, str(exc)))])

        def accept(event: Event) -> bool:
            ns = event.obj["metadata"].get("namespace", "")
            return event.resource == kind.resource and namespace in (None, ns) and selector.matches(event.obj)

        # Without a resourceVersion a watch starts with the current state as synthetic ADDED events.
        initial = [] if since is not None else self.store.objects(kind.resource, namespace, selector)
        first = [_line("ADDED", obj) for obj in initial] + [_line(e.type, e.obj) for e in backlog if accept(e)]
        stream = WatchStream(self.store, queue, first)
        stream.accept = accept
        stream.timeout = float(timeout) if timeout else DEFAULT_WATCH_TIMEOUT
        stream.cut_after = self.faults.take_watch_cut(kind.resource, namespace or "")
        return stream

    async def namespace(self, request: Request) -> Response:
        kind = KINDS[("v1", "namespaces")]
        name = request.path_params["name"]
        failed = await self._faults("get", kind, "", name)
        if failed:
            return failed
        obj = self.store.get("namespaces", "", name)
        return JSONResponse(obj) if obj else not_found(kind, name)

    async def item(self, request: Request) -> Response:
        kind = self._kind(request)
        if kind is None or not kind.namespaced:
            return status_response(404, "the server could not find the requested resource")
        namespace, name = request.path_params["namespace"], request.path_params["name"]
        verb = {"DELETE": "delete", "PATCH": "patch"}.get(request.method, "get")
        # Read before any latency: a request that has arrived whole is carried out even if its client goes away
        # meanwhile (a worker killed while its delete is held), as a real API server does.
        raw = await request.body() if verb != "get" else b""
        obj = await self._target(verb, kind, kind, namespace, name)
        if not isinstance(obj, dict):
            return obj
        if verb == "get":
            return JSONResponse(obj)
        if verb == "patch":
            # A custom resource with a status subresource: the object's own endpoint changes all but `status`.
            return self._patch(kind, obj, request, raw, lambda patch: merge_patch(obj, _without(patch, "status")))
        options: Obj = json.loads(raw) if raw.strip() else {}
        if request.query_params.get("dryRun"):
            options["dryRun"] = [request.query_params["dryRun"]]
        return self._delete(kind, obj, options, request.query_params.get("gracePeriodSeconds"))

    def _delete(self, kind: Kind, obj: Obj, options: Obj, grace_param: str | None) -> Response:
        meta = obj["metadata"]
        wanted_uid = (options.get("preconditions") or {}).get("uid")
        if wanted_uid and wanted_uid != meta["uid"]:
            message = (
                f'Operation cannot be fulfilled on {kind.qualified} "{meta["name"]}": Precondition failed: '
                f"UID in precondition: {wanted_uid}, UID in object meta: {meta['uid']}"
            )
            return status_response(409, message, kind.details(meta["name"]))
        if options.get("dryRun"):
            return JSONResponse(obj)
        grace: Any = options.get("gracePeriodSeconds", grace_param)
        if kind.resource == "pods":
            seconds = int(grace) if grace is not None else int(obj["spec"].get("terminationGracePeriodSeconds", 30))
            # A pod that never reached a node, or a zero grace period, is removed at once.
            if seconds == 0 or not obj["spec"].get("nodeName"):
                removed = self.store.remove(kind.resource, meta["namespace"], meta["name"])
                return JSONResponse(removed)
            return JSONResponse(self.store.mark_deleting(kind.resource, obj, seconds))
        if meta.get("finalizers"):
            return JSONResponse(self.store.mark_deleting(kind.resource, obj))
        return JSONResponse(self.store.remove(kind.resource, meta.get("namespace", ""), meta["name"]))

    async def status(self, request: Request) -> Response:
        """The status subresource: GET, or PATCH with a JSON merge patch of which only `status` is applied (the
        rest of the object is not the subresource's to change). A `metadata.resourceVersion` in the patch is a
        precondition, as a client's optimistic lock: a stale one is a 409."""
        kind = self._kind(request)
        if kind is None:
            return status_response(404, "the server could not find the requested resource")
        namespace, name = request.path_params["namespace"], request.path_params["name"]
        verb = "patch" if request.method == "PATCH" else "get"
        raw = await request.body()
        subresource = Kind(f"{kind.resource}/status", kind.kind, kind.api_version)
        obj = await self._target(verb, kind, subresource, namespace, name)
        if not isinstance(obj, dict):
            return obj
        if verb == "get":
            return JSONResponse(obj)

        def status_only(patch: Obj) -> Obj:
            return obj | {"status": merge_patch(obj.get("status") or {}, patch.get("status") or {})}

        return self._patch(kind, obj, request, raw, status_only)

    def _patch(self, kind: Kind, obj: Obj, request: Request, raw: bytes, apply: Callable[[Obj], Obj]) -> Response:
        """A JSON merge patch of `obj`, `apply` saying which part of it the endpoint changes. A
        `metadata.resourceVersion` in the patch is a precondition, as a client's optimistic lock: a stale one is a
        409."""
        name = obj["metadata"]["name"]
        content_type = request.headers.get("content-type", "").partition(";")[0].strip()
        try:
            patch = json.loads(raw)
        except ValueError:
            return status_response(400, "error decoding patch: invalid JSON")
        if content_type != MERGE_PATCH or not isinstance(patch, dict):
            # The sim takes merge patches only. A JSON object sent as a JSON patch (kubernetes-asyncio's default
            # Content-Type for a dict body is application/json-patch+json) gets the API server's own words.
            got = type(patch).__name__
            return status_response(400, f"json: cannot unmarshal {got} into Go value of type jsonpatch.Patch")
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != obj["metadata"]["resourceVersion"]:
            message = (
                f'Operation cannot be fulfilled on {kind.qualified} "{name}": the object has been modified; please '
                "apply your changes to the latest version and try again"
            )
            return status_response(409, message, kind.details(name))
        patched = apply(patch)
        patched["metadata"] = patched["metadata"] | {
            k: obj["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion") if k in obj["metadata"]
        }
        return JSONResponse(self.store.update(kind.resource, patched))

    async def proxy(self, request: Request) -> Response:
        """The API server's pod proxy in front of Patroni's REST API: Patroni's answers pass through unchanged; a
        pod that is missing or where nothing listens gets the API server's own Status."""
        kind = KINDS[("v1", "pods")]
        namespace, target = request.path_params["namespace"], request.path_params["name"]
        name, _, port = target.partition(":")
        verb = "create" if request.method == "POST" else "get"
        # Read first, as for a delete: a switchover that has arrived whole is carried out if its client goes away.
        raw = await request.body()
        failed = await self._faults(verb, Kind("pods/proxy", "Pod", "v1"), namespace, name)
        if failed:
            return failed
        pod = self.store.get("pods", namespace, name)
        if pod is None:
            return not_found(kind, name)
        if (port and port != str(PORT)) or not self.patroni.serves(pod):
            ip = pod["status"].get("podIP", "")
            message = f"error trying to reach service: dial tcp {ip}:{port or 80}: connect: connection refused"
            return status_response(503, message)
        status, content_type, body = await self.patroni.handle(request.method, pod, request.path_params["path"], raw)
        return Response(body, status_code=status, media_type=content_type)

    # admin

    async def state(self, request: Request) -> Response:
        return JSONResponse(
            {"resourceVersion": self.store.rv, "objects": self.store.dump(), "faults": self.faults.summary()}
        )

    async def fault(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.faults.clear()
            return JSONResponse({"cleared": True})
        try:
            result = self.admin(await request.json())
        except (ValueError, KeyError, TypeError) as exc:
            return status_response(400, f"bad fault spec: {exc}")
        return JSONResponse(result)
