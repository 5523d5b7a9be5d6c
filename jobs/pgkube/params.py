"""What every pg-* job type's params and settings share: where the cluster is (`namespace`, `cluster`, `context`),
how its operator labels it (`profile`), `dry_run`; the clusters' label convention and poll interval; the target a
job claims; and how a step reaches the cluster (`kube_for`, `profile_for`).

A job type's params derive from `ClusterParams` and add their own fields (`pod`, `candidate`, timeouts); its
settings derive from `PgSettings`. Both are validated with the job type's settings in the validation context
(`service.jobtypes.settings_from`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from jobs.pgkube.kube import Kube, KubeClients, KubeNotConfigured, lifespan
from jobs.pgkube.profiles import PROFILES, Profile, ProfileName
from jobs.pgkube.settings import KubeSettings
from service.jobtypes import JobType, Step, StepContext, settings_from

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_WAIT_S = 4 * 3600
MIB = 1024 * 1024


def dns_label(value: str) -> str:
    if len(value) > 63 or not DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a DNS-1123 label: at most 63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def dns_subdomain(value: str) -> str:
    if len(value) <= 253 and DNS_SUBDOMAIN.match(value):
        return value
    raise ValueError(
        f"{value!r} is not a DNS-1123 subdomain: at most 253 lower-case letters, digits, '-' and '.', "
        "each part starting and ending with a letter or digit"
    )


class PgSettings(KubeSettings):
    """`APIOPS_KUBE_*` and the clusters' label convention and poll interval. These two are named after pg-rebuild,
    the first pg-* job type (`APIOPS_PG_REBUILD_PROFILE`, `APIOPS_PG_REBUILD_POLL_INTERVAL_S`), and kept so; they
    apply to every pg-* job type, since a cluster's operator does not change with the job run on it."""

    pg_rebuild_profile: ProfileName = "zalando"
    pg_rebuild_poll_interval_s: Annotated[float, Field(gt=0)] = 2.0


Seconds = Annotated[float, Field(gt=0, le=MAX_WAIT_S)]
LABEL: dict[str, Any] = {"json_schema_extra": {"pattern": DNS_LABEL.pattern, "maxLength": 63}}
SUBDOMAIN: dict[str, Any] = {"json_schema_extra": {"pattern": DNS_SUBDOMAIN.pattern, "maxLength": 253}}
PodName = Annotated[str, AfterValidator(dns_subdomain), Field(**SUBDOMAIN)]


class ClusterParams(BaseModel):
    """Where the PostgreSQL cluster is and how its operator labels it; `dry_run`."""

    model_config = ConfigDict(extra="forbid")

    # The validators give the clear messages; the schema states the same rules for clients and generators.
    namespace: Annotated[str, AfterValidator(dns_label), Field(description="the cluster's namespace", **LABEL)]
    cluster: Annotated[str, AfterValidator(dns_label), Field(description="the PostgreSQL cluster's name", **LABEL)]
    context: Annotated[
        str | None,
        Field(
            max_length=253,
            validate_default=True,
            description="kubeconfig context, one of APIOPS_KUBE_CONTEXTS (default: the first of them)",
        ),
    ] = None
    profile: Annotated[
        ProfileName | None,
        Field(validate_default=True, description="label convention (default: APIOPS_PG_REBUILD_PROFILE)"),
    ] = None
    dry_run: Annotated[bool, Field(description="run the checks and report what would be done; change nothing")] = False

    @field_validator("context")
    @classmethod
    def _allowed_context(cls, value: str | None, info: ValidationInfo) -> str | None:
        allowed = settings_from(info, PgSettings).kube_contexts
        if value is None:
            return allowed[0] if allowed else None
        if value not in allowed:
            known = ", ".join(allowed) if allowed else "none configured; omit `context` to use the current one"
            raise ValueError(f"context {value!r} is not allowed (APIOPS_KUBE_CONTEXTS: {known})")
        return value

    @field_validator("profile")
    @classmethod
    def _default_profile(cls, value: ProfileName | None, info: ValidationInfo) -> ProfileName:
        return value or settings_from(info, PgSettings).pg_rebuild_profile


class PatroniParams(ClusterParams):
    """The params of a job that asks Patroni: the lag it allows a replica. CloudNativePG has no Patroni: such a job is
    refused at submission on the `cnpg` profile, in words that say what it would do (`cnpg_refusal`), unless it has a
    way through CloudNativePG's Cluster resource instead (`cnpg_refusal` None)."""

    cnpg_refusal: ClassVar[str | None] = "this job through its Cluster resource is not supported yet"

    max_lag_bytes: Annotated[
        int, Field(ge=0, description="most bytes a replica may trail the leader to count as healthy")
    ] = MIB

    @model_validator(mode="after")
    def _has_patroni(self) -> PatroniParams:
        if self.profile == "cnpg" and self.cnpg_refusal is not None:
            raise ValueError(f"profile cnpg: CloudNativePG has no Patroni; {self.cnpg_refusal}")
        return self


def cluster_target(params: ClusterParams) -> str:
    """The cluster (`k8s/<context>/<namespace>/<cluster>` once in its kind's namespace): every job that acts on it
    excludes the others."""
    return f"{params.context or 'default'}/{params.namespace}/{params.cluster}"


def kube_for(ctx: StepContext, params: ClusterParams) -> Kube:
    """The Kubernetes client of the job's context, in this worker process."""
    clients = ctx.resource
    if not isinstance(clients, KubeClients):
        raise KubeNotConfigured("this worker has no Kubernetes clients")
    return clients.kube(params.context)


def profile_for(ctx: StepContext, params: ClusterParams) -> Profile:
    settings: PgSettings = ctx.settings
    return PROFILES[params.profile or settings.pg_rebuild_profile]


class Refused(Exception):
    """The cluster is not in a state where the job's action is safe; nothing was changed."""


P = TypeVar("P", bound=ClusterParams)


def pg_job_type(
    name: str, description: str, params: type[P], steps: Sequence[Step[P]], settings: type[PgSettings]
) -> JobType[P]:
    """A pg-* job type: it acts on the cluster (every pg-* job excludes the others on it), a dry run changes nothing
    (no approval needed), and its steps reach Kubernetes through the worker's clients."""
    return JobType[P](
        name=name,
        description=description,
        params=params,
        steps=steps,
        target=cluster_target,
        target_kind="k8s",
        changes_nothing=lambda p: p.dry_run,
        lifespan=lifespan,
        settings=settings,
    )
