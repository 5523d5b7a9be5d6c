"""What every `pg-*` job type needs to reach Kubernetes: `APIOPS_KUBECONFIG`, `APIOPS_KUBE_CONTEXTS` and
`APIOPS_KUBE_REQUEST_TIMEOUT_S`.

A pg-* job type's own settings derive from `KubeSettings` and add their fields (`jobs.pg_rebuild.PgRebuildSettings`);
its lifespan hands them to `jobs.pgkube.kube.lifespan`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from service.settings import EnvSettings, env_list


class KubeSettings(EnvSettings):
    """Where the kubeconfig is, which of its contexts a job may name, and how long one API call may take."""

    # Without a kubeconfig the worker uses the in-cluster service account.
    kubeconfig: Path | None = None
    # Contexts of the kubeconfig that a job may name; the first is the default. Empty: the current context only.
    kube_contexts: Annotated[tuple[str, ...], NoDecode] = ()
    kube_request_timeout_s: Annotated[float, Field(gt=0)] = 10.0

    _parse_contexts = field_validator("kube_contexts", mode="before")(env_list)
