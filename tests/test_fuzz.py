"""The project's own fuzzing: hypothesis over the JSON guards of `service.api.input_limits`, and over the routes
through the real app (its middleware, handlers and PostgreSQL) with hostile bodies, paths, query values and headers.

Whatever a client sends, the API answers below 500, every error in the one JSON shape, and nothing reaches the
parser unchecked or PostgreSQL unstorable (PostgreSQL's refusal would be a 500). The examples are derandomized
(the `ci` profile of tests/conftest.py): every run tries the same ones, so a failure in CI reproduces locally.
`pytest tests/test_fuzz.py --hypothesis-profile=explore` tries new ones, three times as many.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
from hypothesis import example, given, settings
from hypothesis import strategies as st

from service.api.input_limits import MAX_JSON_DEPTH, json_depth, unstorable

# Any character, the lone surrogates (which no UTF-8 text holds) and NUL included.
ANY_CHAR = st.characters(codec=None, exclude_categories=())
HOSTILE_TEXT = st.text(ANY_CHAR, max_size=20) | st.sampled_from(["\x00", "\ud800", "a\udfffb", "\x1b[31m", "\n"])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | HOSTILE_TEXT
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HOSTILE_TEXT, inner, max_size=4), max_leaves=12
)
TYPES = ["noop", "flaky", "no-such-type", "pg-rebuild"]
# Multiples of the profile's: 1,000 and 500 in the `ci` profile, three times as many in `explore`.
PARSER_EXAMPLES = 10 * settings().max_examples
ROUTE_EXAMPLES = 5 * settings().max_examples


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def storable(value: Any) -> bool:
    """What PostgreSQL's jsonb takes: no NUL, and text that is UTF-8 (no lone surrogate), in keys and strings."""
    text = json.dumps(value, ensure_ascii=False)
    return "\x00" not in text and "\\u0000" not in text and _encodes(text)


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def assert_answered(response: httpx.Response) -> None:
    """Below 500, and an error is the one JSON shape: {"error": {"code", "message"[, "details"]}}."""
    request = f"{response.request.method} {response.request.url}"
    assert response.status_code < 500, f"{request}: {response.status_code} {response.text}"
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/json", request
        body = response.json()
        assert set(body) == {"error"}, (request, body)
        assert {"code", "message"} <= set(body["error"]) <= {"code", "message", "details"}, (request, body)
        assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)


# The guards themselves, without the app: fast, so many examples.


@settings(max_examples=PARSER_EXAMPLES)
@given(JSON_VALUES, st.booleans())
def test_json_depth_is_the_nesting_of_any_json_text(value: Any, ascii_only: bool) -> None:
    assert json_depth(json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")) == depth(value)


@settings(max_examples=PARSER_EXAMPLES)
@given(st.binary(max_size=200))
def test_json_depth_reads_any_bytes_without_failing(body: bytes) -> None:
    assert json_depth(body) >= 0


@settings(max_examples=PARSER_EXAMPLES)
@given(JSON_VALUES)
def test_unstorable_finds_exactly_what_postgresql_cannot_store(value: Any) -> None:
    assert (unstorable(value) is None) == storable(value)


# The routes, through the app with its database: every answer below 500 and in the error shape.

NOOP_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "steps": st.integers(-5, 25) | st.sampled_from([10**30, "3", 2.5, True]),
        "sleep_s": st.floats(allow_nan=False) | st.just(0),
        "fail_at_step": st.none() | st.integers(-1, 25),
        "target": st.none() | HOSTILE_TEXT,
    },
)
# Now and then an unknown param too, which noop refuses.
NOOP_BODIES = st.tuples(NOOP_PARAMS, st.dictionaries(HOSTILE_TEXT, JSON_VALUES, max_size=1)).map(
    lambda parts: {**parts[1], **parts[0]}
)


def _json_bodies() -> st.SearchStrategy[bytes]:
    as_json = (NOOP_BODIES | JSON_VALUES).map(lambda value: json.dumps(value).encode())
    nested = st.tuples(st.integers(MAX_JSON_DEPTH - 2, 3000), st.sampled_from("[{")).map(
        lambda n: b'{"a": ' + n[1].encode() * n[0] + (b"]" if n[1] == "[" else b"}") * n[0] + b"}"
    )
    huge_number = st.integers(4000, 6000).map(lambda digits: b'{"steps": ' + b"9" * digits + b"}")
    return as_json | st.binary(max_size=100) | nested | huge_number


@settings(max_examples=ROUTE_EXAMPLES)
@given(
    job_type=st.sampled_from(TYPES),
    body=_json_bodies(),
    content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", None]),
)
# Found by the fuzzer: an error message that quotes a lone surrogate (here an unknown param's name) was a 500.
@example(job_type="noop", body=b'{"\\ud800": 1}', content_type="application/json")
@example(job_type="noop", body=b'{"target": "a\\u0000b"}', content_type="application/json")
async def test_any_body_is_answered_in_the_error_shape_and_never_a_500(
    client: httpx.AsyncClient, db: asyncpg.Connection, job_type: str, body: bytes, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await client.post(f"/ops/jobs/{job_type}", content=body, headers=headers)

    assert_answered(response)
    if response.status_code in (200, 202):  # stored: and read back as it was sent
        job = (await client.get(f"/ops/jobs/{response.json()['job_id']}")).json()
        sent = json.loads(body) if body.strip() else {}  # an empty body means every param at its default
        assert job["params"] == {**job["params"], **sent}


SEGMENTS = st.text(ANY_CHAR, max_size=12).map(lambda text: quote(text.encode("utf-8", "surrogatepass"), safe=""))
RAW_SEGMENTS = st.binary(max_size=8).map(lambda raw: "".join(f"%{byte:02x}" for byte in raw))


@settings(max_examples=ROUTE_EXAMPLES)
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "OPTIONS", "PUT"]),
    prefix=st.sampled_from(["/ops/jobs/", "/ops/jobs/noop-", "/ops/", "/", "/ops/job-types/", "/ops/workers/"]),
    segment=SEGMENTS | RAW_SEGMENTS,
    suffix=st.sampled_from(["", "/cancel", "/retry", "/events", "/"]),
)
async def test_any_path_is_answered_in_the_error_shape_and_never_a_500(
    client: httpx.AsyncClient, method: str, prefix: str, segment: str, suffix: str
) -> None:
    url = httpx.URL(f"http://apiops.test{prefix}{segment}{suffix}")
    assert_answered(await client.request(method, url))


QUERY_NAMES = st.sampled_from(["type", "status", "actor", "target", "since", "limit", "cursor", "include", "after"])


@settings(max_examples=ROUTE_EXAMPLES)
@given(
    path=st.sampled_from(["/ops/jobs", "/ops/jobs/noop-00000000000000000000000000", "/ops/jobs/x/events"]),
    query=st.lists(st.tuples(QUERY_NAMES | SEGMENTS, SEGMENTS | RAW_SEGMENTS), max_size=4),
)
async def test_any_query_is_answered_in_the_error_shape_and_never_a_500(
    client: httpx.AsyncClient, path: str, query: list[tuple[str, str]]
) -> None:
    # Percent-encoded by hand, so that any byte (NUL, invalid UTF-8) reaches the app as sent.
    raw = "&".join(f"{name}={value}" for name, value in query)
    assert_answered(await client.get(httpx.URL(f"http://apiops.test{path}", query=raw.encode())))


HEADER_NAMES = st.sampled_from(
    ["X-API-Key", "Idempotency-Key", "X-Request-ID", "Last-Event-ID", "Content-Type", "X-Forwarded-For", "Accept"]
)
# Bytes a header value may carry on the wire (no CR or LF, which end it), the ones no decoder likes included.
HEADER_VALUES = st.binary(max_size=40).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b""))


@settings(max_examples=ROUTE_EXAMPLES)
@given(
    request=st.sampled_from(
        [("POST", "/ops/jobs/noop"), ("GET", "/ops/jobs"), ("GET", "/ops/jobs/x/events"), ("GET", "/readyz")]
    ),
    extra=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=4),
)
async def test_any_header_is_answered_in_the_error_shape_and_never_a_500(
    client: httpx.AsyncClient, request: tuple[str, str], extra: list[tuple[str, bytes]]
) -> None:
    method, path = request
    headers = [(name.encode(), value) for name, value in extra]  # beside the client's own X-API-Key
    response = await client.request(method, path, headers=headers, content=b"{}" if method == "POST" else None)
    assert_answered(response)
