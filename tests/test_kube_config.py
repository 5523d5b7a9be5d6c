"""Kubernetes not configured, or configured wrong, is said in words that name the setting to fix: at the worker's
start-up in its log, and in the job that needed it, never as the client library's own riddle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobs.pg_rebuild import PgRebuildSettings
from jobs.pgkube.kube import KubeClients, KubeNotConfigured
from jobs.pgkube.settings import KubeSettings
from service.settings import Settings
from tests.conftest import TEST_REGISTRY, api_client, headers, read_job, run_burst, submit


async def _problem(settings: KubeSettings) -> str:
    clients = KubeClients(settings)
    await clients.open()
    try:
        with pytest.raises(KubeNotConfigured) as refused:
            clients.kube(None)
    finally:
        await clients.close()
    return str(refused.value)


async def test_a_mistyped_kubeconfig_path_is_named(tmp_path: Path) -> None:
    problem = await _problem(KubeSettings(kubeconfig=tmp_path / "kubconfig"))
    assert f"APIOPS_KUBECONFIG={tmp_path / 'kubconfig'}: no such file" in problem


@pytest.mark.skipif("KUBERNETES_SERVICE_HOST" in os.environ, reason="runs inside a Kubernetes pod")
async def test_no_kubeconfig_outside_a_cluster_says_to_set_apiops_kubeconfig() -> None:
    problem = await _problem(KubeSettings(kubeconfig=None))
    assert "no Kubernetes configured: set APIOPS_KUBECONFIG to a kubeconfig file" in problem


@pytest.mark.skipif("KUBERNETES_SERVICE_HOST" in os.environ, reason="runs inside a Kubernetes pod")
async def test_a_rebuild_on_a_worker_without_kubernetes_fails_saying_what_to_set(settings: Settings) -> None:
    registry = TEST_REGISTRY.with_settings({"pg-rebuild": PgRebuildSettings(kubeconfig=None, kube_contexts=())})
    async with api_client(settings, registry, headers=headers("writer")) as client:
        job_id = await submit(client, "pg-rebuild", namespace="db", cluster="pg", pod="pg-1")
        await run_burst(settings, registry=registry)
        job = await read_job(client, job_id)
    assert job["status"] == "failed"
    assert "set APIOPS_KUBECONFIG" in job["error"] and "Traceback" not in job["error"]
