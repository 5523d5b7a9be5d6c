"""Kubernetes access for job steps: one ApiClient per context per worker process, and typed views of what they read.

`lifespan(settings)` is the pg-* job types' lifespan, given their `KubeSettings`: it loads the kubeconfig (or the
in-cluster service account) into explicit `Configuration` objects, builds the ApiClients once at worker start-up
and closes them at shutdown. A worker without Kubernetes configured still starts (it runs other job types); the
steps that need Kubernetes then fail with the reason.

Every call carries `_request_timeout`. What is worth retrying (429, 5xx, a connection error or a request
timeout) is raised as `TransientError`, so the engine retries the step with backoff inside its deadline; a 429
with a short `Retry-After` is waited out here first. A 404 on delete means the object is already gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from jobs.pgkube.settings import KubeSettings
from service.backoff import Backoff
from service.jobtypes import TransientError

if TYPE_CHECKING:
    # The client (with aiohttp) is imported only where it is used: the API process imports this module through
    # the job registry, never calls Kubernetes, and would carry some 45 MB for nothing.
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A 429's Retry-After is waited out here when it is short: the server says how long (`initial_s` is not used).
RETRY_AFTER = Backoff(initial_s=0.0, cap_s=10.0, max_attempts=3)
DEFAULT_CONTEXT = ""  # the key of the kubeconfig's current context (or the in-cluster config)


class KubeNotConfigured(Exception):
    """No usable Kubernetes configuration for the context a job names."""


class KubeError(Exception):
    """A Kubernetes API error that retrying will not fix (403, 404, 409, 422, ...)."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


# What the steps see of the objects: plain, typed snapshots, so no step touches the client's untyped models.


@dataclass(frozen=True)
class Condition:
    status: str
    reason: str | None
    message: str | None


@dataclass(frozen=True)
class ContainerView:
    name: str
    restarts: int
    ready: bool
    waiting_reason: str | None
    waiting_message: str | None
    last_terminated: str | None  # "Error (exit code 1)"


@dataclass(frozen=True)
class PodView:
    name: str
    uid: str
    labels: dict[str, str]
    phase: str
    node: str | None
    deleting: bool
    claims: tuple[str, ...]
    owner_kind: str | None
    owner_name: str | None
    grace_s: int | None
    conditions: dict[str, Condition] = field(default_factory=dict)
    containers: tuple[ContainerView, ...] = ()

    @property
    def ready(self) -> bool:
        cond = self.conditions.get("Ready")
        return cond is not None and cond.status == "True"

    @property
    def restarts(self) -> int:
        return sum(c.restarts for c in self.containers)


@dataclass(frozen=True)
class PvcView:
    name: str
    uid: str
    phase: str
    deleting: bool
    finalizers: tuple[str, ...]
    storage: str | None


@dataclass(frozen=True)
class StatefulSetView:
    name: str
    uid: str
    replicas: int
    ready_replicas: int
    current_revision: str | None
    update_revision: str | None
    claim_templates: tuple[str, ...]

    @property
    def rolling_out(self) -> bool:
        return bool(self.update_revision) and self.current_revision != self.update_revision


def _pod_view(pod: Any) -> PodView:
    meta, spec, status = pod.metadata, pod.spec, pod.status
    owner = next((ref for ref in meta.owner_references or [] if ref.controller), None)
    containers = []
    for cs in [*(status.init_container_statuses or []), *(status.container_statuses or [])]:
        waiting = cs.state.waiting if cs.state else None
        terminated = cs.last_state.terminated if cs.last_state else None
        containers.append(
            ContainerView(
                name=cs.name,
                restarts=int(cs.restart_count or 0),
                ready=bool(cs.ready),
                waiting_reason=waiting.reason if waiting else None,
                waiting_message=waiting.message if waiting else None,
                last_terminated=f"{terminated.reason} (exit code {terminated.exit_code})" if terminated else None,
            )
        )
    return PodView(
        name=meta.name,
        uid=meta.uid,
        labels=dict(meta.labels or {}),
        phase=status.phase or "Unknown",
        node=spec.node_name,
        deleting=meta.deletion_timestamp is not None,
        claims=tuple(v.persistent_volume_claim.claim_name for v in spec.volumes or [] if v.persistent_volume_claim),
        owner_kind=owner.kind if owner else None,
        owner_name=owner.name if owner else None,
        grace_s=spec.termination_grace_period_seconds,
        conditions={c.type: Condition(c.status, c.reason, c.message) for c in status.conditions or []},
        containers=tuple(containers),
    )


def _pvc_view(pvc: Any) -> PvcView:
    capacity = (pvc.status.capacity if pvc.status else None) or {}
    return PvcView(
        name=pvc.metadata.name,
        uid=pvc.metadata.uid,
        phase=(pvc.status.phase if pvc.status else None) or "Unknown",
        deleting=pvc.metadata.deletion_timestamp is not None,
        finalizers=tuple(pvc.metadata.finalizers or ()),
        storage=capacity.get("storage"),
    )


def _statefulset_view(sts: Any) -> StatefulSetView:
    status = sts.status
    return StatefulSetView(
        name=sts.metadata.name,
        uid=sts.metadata.uid,
        replicas=int(sts.spec.replicas if sts.spec.replicas is not None else 1),
        ready_replicas=int((status.ready_replicas if status else None) or 0),
        current_revision=status.current_revision if status else None,
        update_revision=status.update_revision if status else None,
        claim_templates=tuple(t.metadata.name for t in sts.spec.volume_claim_templates or []),
    )


DeleteOutcome = Literal["deleted", "gone", "conflict"]


@dataclass(frozen=True)
class ProxyAnswer:
    """What a pod's own server answered through the API server's pod proxy: any status, its body as text."""

    status: int
    text: str


class Kube:
    """The calls the jobs make, against one context. Reads return None for a 404."""

    def __init__(self, api: client.ApiClient, timeout_s: float) -> None:
        from kubernetes_asyncio import client

        self._core: Any = client.CoreV1Api(api)
        self._apps: Any = client.AppsV1Api(api)
        self._custom: Any = client.CustomObjectsApi(api)
        self.timeout_s = timeout_s

    async def pod(self, namespace: str, name: str) -> PodView | None:
        found = await self._read(self._core.read_namespaced_pod, name, namespace)
        return _pod_view(found) if found is not None else None

    async def pods(self, namespace: str, selector: str) -> list[PodView]:
        found = await self._call(self._core.list_namespaced_pod, namespace, label_selector=selector)
        return sorted((_pod_view(p) for p in found.items), key=lambda p: p.name)

    async def pvc(self, namespace: str, name: str) -> PvcView | None:
        found = await self._read(self._core.read_namespaced_persistent_volume_claim, name, namespace)
        return _pvc_view(found) if found is not None else None

    async def statefulset(self, namespace: str, name: str) -> StatefulSetView | None:
        found = await self._read(self._apps.read_namespaced_stateful_set, name, namespace)
        return _statefulset_view(found) if found is not None else None

    async def custom_object(self, group: str, version: str, namespace: str, plural: str, name: str) -> Any:
        """A custom resource (e.g. a CloudNativePG Cluster) as the API server returns it: plain JSON; None if gone."""
        return await self._read(self._custom.get_namespaced_custom_object, group, version, namespace, plural, name)

    async def patch_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str, patch: dict[str, Any]
    ) -> Any:
        """A JSON merge patch of a custom resource itself (its metadata or spec; never its status, which has its own
        subresource): see `patch_custom_status`."""
        return await self._merge_patch(
            self._custom.patch_namespaced_custom_object, group, version, namespace, plural, name, patch
        )

    async def patch_custom_status(
        self, group: str, version: str, namespace: str, plural: str, name: str, patch: dict[str, Any]
    ) -> Any:
        """A JSON merge patch of a custom resource's status subresource. The client would send a dict as a JSON
        patch (its default Content-Type for PATCH), which the API server refuses, hence the explicit type. A
        `metadata.resourceVersion` in `patch` makes it conditional: a 409 (KubeError) when the object changed."""
        method = self._custom.patch_namespaced_custom_object_status
        return await self._merge_patch(method, group, version, namespace, plural, name, patch)

    async def _merge_patch(self, method: Any, *args: Any) -> Any:
        return await self._call(method, *args, _content_type="application/merge-patch+json")

    async def delete_pod(
        self, namespace: str, name: str, uid: str, grace_s: int | None, dry_run: bool = False
    ) -> DeleteOutcome:
        from kubernetes_asyncio import client

        body = client.V1DeleteOptions(grace_period_seconds=grace_s, preconditions=client.V1Preconditions(uid=uid))
        return await self._delete(self._core.delete_namespaced_pod, name, namespace, body, dry_run)

    async def delete_pvc(self, namespace: str, name: str, uid: str, dry_run: bool = False) -> DeleteOutcome:
        from kubernetes_asyncio import client

        body = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid))
        return await self._delete(self._core.delete_namespaced_persistent_volume_claim, name, namespace, body, dry_run)

    async def proxy(
        self,
        namespace: str,
        pod: str,
        port: int,
        path: str,
        body: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> ProxyAnswer:
        """GET `path` (POST `body` as JSON when given) on `port` of `pod`, through the API server's pod proxy.

        The answer of the pod's server is returned whatever its status: what a status means is the caller's to say.
        The API server's own refusals (a Status body: the pod is missing, the Role lacks `pods/proxy`, nothing
        listens) are raised as for any other call. GET goes through the generated
        `connect_get_namespaced_pod_proxy_with_path`; its POST twin takes no body, so POST goes through the same
        ApiClient's `call_api` on the same path. Both read the body raw (`_preload_content=False`): the generated
        method would turn a JSON answer into the repr of a dict."""
        name = f"{pod}:{port}"

        async def exchange(_request_timeout: float) -> ProxyAnswer:
            if body is None:
                response = await self._core.connect_get_namespaced_pod_proxy_with_path(
                    name, namespace, path, _preload_content=False, _request_timeout=_request_timeout
                )
            else:
                response = await self._core.api_client.call_api(
                    "/api/v1/namespaces/{namespace}/pods/{name}/proxy/{path}",
                    "POST",
                    path_params={"namespace": namespace, "name": name, "path": path},
                    header_params={"Content-Type": "application/json", "Accept": "*/*"},
                    body=body,
                    auth_settings=["BearerToken"],
                    _preload_content=False,
                    _request_timeout=_request_timeout,
                )
            try:
                return ProxyAnswer(response.status, (await response.read()).decode("utf-8", "replace"))
            finally:
                response.release()

        answer = await self._call(exchange, timeout_s=timeout_s)
        if answer.status >= 400 and _is_status(answer.text):
            raise _translate_status(answer.status, answer.text)
        return answer

    async def _delete(
        self, method: Callable[..., Awaitable[Any]], name: str, namespace: str, body: Any, dry_run: bool
    ) -> DeleteOutcome:
        extra: dict[str, Any] = {"dry_run": "All"} if dry_run else {}
        try:
            await self._call(method, name, namespace, body=body, **extra)
        except KubeError as exc:
            if exc.status == 404:
                return "gone"
            if exc.status == 409:  # the uid precondition failed: the object was replaced since it was read
                return "conflict"
            raise
        return "deleted"

    async def _read(self, method: Callable[..., Awaitable[T]], *args: Any) -> T | None:
        try:
            return await self._call(method, *args)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def _call(
        self, method: Callable[..., Awaitable[T]], *args: Any, timeout_s: float | None = None, **kwargs: Any
    ) -> T:
        import aiohttp
        from kubernetes_asyncio.client.exceptions import ApiException

        retries = RETRY_AFTER.retries()
        while True:
            try:
                return await method(*args, _request_timeout=timeout_s or self.timeout_s, **kwargs)
            except ApiException as exc:
                wait = _retry_after(exc)
                if wait is not None:
                    retries.failed(asked_s=wait)
                    if not retries.exhausted:
                        logger.info("Kubernetes asks to retry after %gs (HTTP %s)", wait, exc.status)
                        await asyncio.sleep(wait)
                        continue
                raise _translate(exc) from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                # A request timeout here is aiohttp's, never the step's deadline (that surfaces as cancellation).
                raise TransientError(f"Kubernetes API unreachable: {type(exc).__name__}: {exc}") from exc


def _retry_after(exc: ApiException) -> float | None:
    if exc.status != 429 or not exc.headers:
        return None
    try:
        seconds = float(exc.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _translate(exc: ApiException) -> Exception:
    return _translate_status(exc.status, exc.body, exc.reason)


def _translate_status(status: int | None, body: Any, reason: str | None = None) -> Exception:
    message = _status_message(body, reason)
    if status == 429 or (status or 0) >= 500:
        return TransientError(f"Kubernetes API HTTP {status}: {message}")
    return KubeError(f"Kubernetes API HTTP {status}: {message}", status)


def _parsed(body: Any) -> Any:
    try:
        return json.loads(body) if body else {}
    except (ValueError, TypeError):
        return {}


def _is_status(body: str) -> bool:
    """Whether a body is the API server's own Status, not what the pod behind the proxy answered."""
    parsed = _parsed(body)
    return isinstance(parsed, dict) and parsed.get("kind") == "Status"


def _status_message(body: Any, reason: str | None) -> str:
    """The `message` of the Status body the API server sends with every error, else the HTTP reason."""
    parsed = _parsed(body)
    message = parsed.get("message") if isinstance(parsed, dict) else None
    return str(message or reason or "no message")


# Per worker process


class KubeClients:
    """The ApiClients of one worker process, by context."""

    def __init__(self, settings: KubeSettings) -> None:
        self.settings = settings
        self._clients: dict[str, client.ApiClient] = {}
        self._errors: dict[str, str] = {}

    async def open(self) -> None:
        from kubernetes_asyncio import client
        from kubernetes_asyncio.config.config_exception import ConfigException

        contexts: tuple[str, ...] = self.settings.kube_contexts or (DEFAULT_CONTEXT,)
        for name in contexts:
            try:
                cfg = await self._configuration(name)
            except (ConfigException, OSError, ValueError, KeyError, TypeError) as exc:
                self._errors[name] = f"{type(exc).__name__}: {exc}"
                logger.warning("Kubernetes context %r not usable: %s", name or "(current)", exc)
                continue
            self._clients[name] = client.ApiClient(cfg)

    async def _configuration(self, context: str) -> client.Configuration:
        from kubernetes_asyncio import client, config
        from kubernetes_asyncio.config.config_exception import ConfigException

        cfg = client.Configuration()
        if self.settings.kubeconfig is not None:
            missing = _missing(self.settings.kubeconfig)
            if missing is not None:
                raise ConfigException(missing)
            await config.load_kube_config(
                config_file=str(self.settings.kubeconfig),
                context=context or None,
                client_configuration=cfg,
                persist_config=False,
            )
        elif context:
            raise ConfigException(f"context {context!r} named, but APIOPS_KUBECONFIG is not set")
        else:
            try:
                # Synchronous, but it only reads two small files once, at start-up.
                config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            except ConfigException as exc:
                raise ConfigException(
                    f"no Kubernetes configured: set APIOPS_KUBECONFIG to a kubeconfig file, or run the worker in a "
                    f"pod with a service account (in-cluster configuration: {exc})"
                ) from exc
        return cfg

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for api in clients:
            await api.close()

    def kube(self, context: str | None) -> Kube:
        name = context or DEFAULT_CONTEXT
        api = self._clients.get(name)
        if api is None:
            reason = self._errors.get(name) or "not among APIOPS_KUBE_CONTEXTS"
            raise KubeNotConfigured(f"Kubernetes context {name or '(current)'!r} is not usable: {reason}")
        return Kube(api, self.settings.kube_request_timeout_s)


def _missing(kubeconfig: Path) -> str | None:
    """Why the kubeconfig cannot be read, said before the client would say "no configuration found"; one stat, at
    a worker's start-up."""
    if kubeconfig.is_file():
        return None
    return f"APIOPS_KUBECONFIG={kubeconfig}: no such file" if not kubeconfig.exists() else f"{kubeconfig} is no file"


@asynccontextmanager
async def lifespan(settings: KubeSettings) -> AsyncIterator[KubeClients]:
    clients = KubeClients(settings)
    try:
        await clients.open()
        yield clients
    finally:
        await clients.close()
