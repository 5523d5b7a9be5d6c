"""The OpenAPI document describes every route, and schemathesis finds no server error or schema break in the API."""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
from starlette.endpoints import HTTPEndpoint
from starlette.routing import BaseRoute, Mount, Route, compile_path

from service.api.app import create_app
from service.settings import Settings
from tests.conftest import KEYS, TEST_REGISTRY, live_api

SCHEMATHESIS = str(Path(sys.executable).with_name("st"))
HTTP_METHODS = {"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"}


def served(routes: Sequence[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(path template, method) for each operation the app serves, read from its routes. HEAD is left out: Starlette
    answers it wherever GET is served, and the document need not list it."""
    for route in routes:
        if isinstance(route, Mount):
            yield from served(route.routes, prefix + route.path)
        elif isinstance(route, Route):
            if not route.include_in_schema:
                continue
            if route.methods is not None:
                methods = set(route.methods)
            else:  # an HTTPEndpoint: it serves the methods it has a handler for
                assert inspect.isclass(route.endpoint) and issubclass(route.endpoint, HTTPEndpoint), route
                methods = {method for method in HTTP_METHODS if hasattr(route.endpoint, method.lower())}
            for method in sorted(methods - {"HEAD"}):
                yield prefix + route.path, method
        else:
            raise AssertionError(f"a kind of route this test does not read: {route!r}")


def matches(template: str, path: str) -> bool:
    """Whether a route's path template takes a documented path; a documented parameter ({job_id}) stands for any
    value of its segment."""
    return compile_path(template)[0].match(path) is not None


async def test_document_describes_every_route_and_method_and_nothing_else(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    document = (await client.get("/openapi.json")).json()
    operations = sorted(
        (path, method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method.upper() in HTTP_METHODS
    )
    routes = sorted(set(served(create_app(settings, TEST_REGISTRY).routes)))

    assert document["openapi"].startswith("3.1")
    undocumented = [(t, m) for t, m in routes if not any(m == op_m and matches(t, op) for op, op_m in operations)]
    assert undocumented == [], "served but not in the OpenAPI document"
    unserved = [(op, op_m) for op, op_m in operations if not any(m == op_m and matches(t, op) for t, m in routes)]
    assert unserved == [], "in the OpenAPI document but not served"


async def test_document_describes_each_job_types_params(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    paths = document["paths"]
    types = (await client.get("/ops/job-types")).json()["job_types"]
    assert types
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
            SCHEMATHESIS, "--config-file", str(Path(__file__).with_name("schemathesis.toml")),
            "run", f"{base}/openapi.json",
            "--header", f"X-API-Key: {KEYS['admin'][0]}",
            "--checks", "all",
            # The stream of a job that never finishes never ends: covered by tests/test_events_stream.py.
            "--exclude-path-regex", "/events$",
            "--max-examples", "25",
            "--request-timeout", "10",
            # Reproducible: one seed, and no database of earlier failures replayed into the run.
            "--seed", "1", "--generation-database", "none",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await process.communicate()

    report = output.decode()
    assert process.returncode == 0, report[-6000:]
