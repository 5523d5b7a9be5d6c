"""The OpenAPI document describes every route, and schemathesis finds no server error or schema break in the API."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx

from service.settings import Settings
from tests.conftest import KEYS, live_api

SCHEMATHESIS = str(Path(sys.executable).with_name("st"))


async def test_document_covers_every_route_and_job_type(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()

    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    for path in (
        "/ops/jobs",
        "/ops/jobs/{job_id}",
        "/ops/jobs/{job_id}/cancel",
        "/ops/jobs/{job_id}/retry",
        "/ops/jobs/{job_id}/events",
        "/ops/job-types",
        "/livez",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ):
        assert path in paths, path
    types = (await client.get("/ops/job-types")).json()["job_types"]
    for job_type in types:
        submit = paths[f"/ops/jobs/{job_type['name']}"]["post"]
        schema_ref = submit["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert (
            document["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]["properties"]
            == (job_type["params_schema"]["properties"])
        )
        assert {"202", "200", "401", "409", "413", "415", "422"} <= set(submit["responses"])


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(settings: Settings) -> None:
    async with live_api(settings) as base:
        process = await asyncio.create_subprocess_exec(
            SCHEMATHESIS, "run", f"{base}/openapi.json",
            "--header", f"X-API-Key: {KEYS['admin'][0]}",
            "--checks", "all",
            # Excluded: "valid data must be accepted". A reused Idempotency-Key with another body is a 422 by design
            # (a rule about earlier requests, which no schema can state), and schemathesis reuses keys freely.
            # And "Allow matches the documented methods": /ops/jobs/<type> (POST) and /ops/jobs/<job_id> (GET) share
            # one URL template, so a 405 there rightly allows both, while the document lists them apart.
            "--exclude-checks", "positive_data_acceptance,allow_header_conformance",
            # The stream of a job that never finishes never ends: covered by tests/test_events_stream.py.
            "--exclude-path-regex", "/events$",
            "--max-examples", "25",
            "--request-timeout", "10",
            "--seed", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await process.communicate()

    report = output.decode()
    assert process.returncode == 0, report[-6000:]
