"""http.fetch, every setting left out and set, against a real HTTP server on loopback."""

from __future__ import annotations

import datetime as dt
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from automator import WorkflowFileError
from automator.testing import WorkflowRunner
from tests.steps.coverage import covers

FETCH = "http.fetch"

RSS = b"""<?xml version="1.0"?>
<rss version="2.0" xmlns:dc="http://purl.org/dc/elements/1.1/"><channel><title>News</title>
<item><guid>urn:1</guid><title>First</title><link>https://example.org/1</link>
<description>One</description><pubDate>Mon, 02 Mar 2026 10:00:00 GMT</pubDate><dc:creator>Ana</dc:creator></item>
<item><title>No guid</title><link>https://example.org/2</link></item>
</channel></rss>"""

ATOM = b"""<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>Log</title><id>urn:feed</id><updated>2026-03-02T10:00:00Z</updated>
<entry><id>urn:a1</id><title>Atom entry</title><link rel="alternate" href="https://example.org/a1"/>
<updated>2026-03-02T10:00:00Z</updated><summary>Short</summary><author><name>Bo</name></author></entry>
</feed>"""


def run(runner: WorkflowRunner, settings: str, **kwargs: Any) -> Any:
    return runner.run(
        f"""
        steps:
          - id: src
            uses: http.fetch
            with: {settings}
          - {{id: out, uses: test.deliver}}
        """,
        **kwargs,
    )


def recorder(httpserver: HTTPServer, path: str, reply: Response) -> list[Request]:
    seen: list[Request] = []

    def handle(request: Request) -> Response:
        request.get_data()  # read the body while the request is open
        seen.append(request)
        return reply

    httpserver.expect_request(path).respond_with_handler(handle)
    return seen


def json_reply(document: Any) -> Response:
    return Response(json.dumps(document), content_type="application/json")


@covers(FETCH, "url", absent=True)
def test_url_is_required(automator_runner: WorkflowRunner) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load("steps:\n  - {id: src, uses: http.fetch, with: {method: GET}}\n")

    [problem] = caught.value.problems
    assert problem.line == 2 and "missing required key 'url'" in problem.message


@covers(FETCH, "url", "method", "headers", "params", "body", "format", "items", absent=True)
def test_with_only_a_url_it_gets_the_url_as_written_and_reads_json_by_its_content_type(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    seen = recorder(httpserver, "/tickets", json_reply([{"id": 1}, {"id": 2}]))

    result = run(automator_runner, f'{{url: "{httpserver.url_for("/tickets")}?status=new&page=2"}}')

    assert result.status == "succeeded", result.error
    [request] = seen
    assert request.method == "GET"  # method: GET
    assert request.query_string == b"status=new&page=2"  # params: {} leaves the url's query alone
    assert request.get_data() == b""  # body: null sends none
    assert "Authorization" not in request.headers  # headers: {} adds none
    assert result.delivered["out"] == [{"id": 1}, {"id": 2}]  # format: auto -> json; items: null -> the document


@covers(FETCH, "url", "method", "headers", "params", "body", absent=False)
def test_method_headers_params_and_body_are_sent_rendered(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    seen = recorder(httpserver, "/search", json_reply([{"id": 1}]))

    result = automator_runner.run(
        f"""
        params: {{team: ops}}
        steps:
          - id: src
            uses: http.fetch
            with:
              url: "{httpserver.url_for("/search")}?status=new"
              method: POST
              headers: {{Authorization: "Bearer {{{{ secrets.TOKEN }}}}"}}
              params: {{team: "{{{{ params.team }}}}", status: open}}
              body: {{query: "{{{{ params.team }}}}", limit: 5}}
          - {{id: out, uses: test.deliver}}
        """,
        secrets={"TOKEN": "t0ken-123"},
    )

    assert result.status == "succeeded", result.error
    [request] = seen
    assert request.method == "POST"
    assert request.headers["Authorization"] == "Bearer t0ken-123"
    assert sorted(request.args.items(multi=True)) == [("status", "open"), ("team", "ops")]  # params win
    assert json.loads(request.get_data()) == {"query": "ops", "limit": 5}


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        ("text/plain", b"hello\nworld\n", "text"),
        ("application/rss+xml", RSS, "feed"),
        ("application/atom+xml", ATOM, "feed"),
        ("application/xml", RSS, "feed"),
    ],
)
@covers(FETCH, "format", absent=True)
def test_format_auto_reads_the_content_type(
    automator_runner: WorkflowRunner, httpserver: HTTPServer, content_type: str, body: bytes, expected: str
) -> None:
    httpserver.expect_request("/doc").respond_with_data(body, content_type=content_type)

    result = run(automator_runner, f'{{url: "{httpserver.url_for("/doc")}"}}')

    assert result.status == "succeeded", result.error
    items = result.delivered["out"]
    if expected == "text":
        assert items == [{"text": "hello\nworld\n", "status": 200, "url": httpserver.url_for("/doc")}]
    else:
        assert set(items[0]) == {"id", "title", "link", "summary", "published", "author"}


@covers(FETCH, "format", "items", absent=False)
def test_format_and_items_path(automator_runner: WorkflowRunner, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/lines").respond_with_data("a\n\nb\n", content_type="application/json")
    httpserver.expect_request("/nested").respond_with_data(
        json.dumps({"data": {"tickets": [{"id": 7}, 8]}}), content_type="text/plain"
    )

    lines = run(automator_runner, f'{{url: "{httpserver.url_for("/lines")}", format: lines}}')
    nested = run(automator_runner, f'{{url: "{httpserver.url_for("/nested")}", items: data.tickets}}')
    forced = run(automator_runner, f'{{url: "{httpserver.url_for("/nested")}", format: json}}')

    assert lines.delivered["out"] == [{"line": "a"}, {"line": "b"}]
    # text/plain with items: read as JSON; an entry that is not an object becomes {value: ...}
    assert nested.delivered["out"] == [{"id": 7}, {"value": 8}]
    assert forced.delivered["out"] == [{"data": {"tickets": [{"id": 7}, 8]}}]


@covers(FETCH, "format", absent=False)
def test_feed_items_have_the_documented_fields(automator_runner: WorkflowRunner, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/rss").respond_with_data(RSS, content_type="text/plain")
    httpserver.expect_request("/atom").respond_with_data(ATOM, content_type="text/plain")

    rss = run(automator_runner, f'{{url: "{httpserver.url_for("/rss")}", format: feed}}').delivered["out"]
    atom = run(automator_runner, f'{{url: "{httpserver.url_for("/atom")}", format: feed}}').delivered["out"]

    assert rss == [
        {
            "id": "urn:1",
            "title": "First",
            "link": "https://example.org/1",
            "summary": "One",
            "published": "Mon, 02 Mar 2026 10:00:00 GMT",
            "author": "Ana",
        },
        # no guid: the link is the id; fields the entry lacks are null
        {
            "id": "https://example.org/2",
            "title": "No guid",
            "link": "https://example.org/2",
            "summary": None,
            "published": None,
            "author": None,
        },
    ]
    assert atom == [
        {
            "id": "urn:a1",
            "title": "Atom entry",
            "link": "https://example.org/a1",
            "summary": "Short",
            "published": "2026-03-02T10:00:00Z",
            "author": "Bo",
        }
    ]


@covers(FETCH, "timeout", absent=True)
def test_default_timeout_waits_for_a_slow_server(automator_runner: WorkflowRunner, httpserver: HTTPServer) -> None:
    answer = threading.Event()

    def slow(request: Request) -> Response:
        answer.wait(1.0)  # a second: well inside the 30s default
        return json_reply([{"id": 1}])

    httpserver.expect_request("/slow").respond_with_handler(slow)

    result = run(automator_runner, f'{{url: "{httpserver.url_for("/slow")}"}}')

    assert result.status == "succeeded", result.error


@covers(FETCH, "timeout", absent=False)
def test_a_short_timeout_fails_the_fetch(automator_runner: WorkflowRunner, httpserver: HTTPServer) -> None:
    release = threading.Event()

    def slow(request: Request) -> Response:
        release.wait(5)
        return json_reply([])

    httpserver.expect_request("/slow").respond_with_handler(slow)
    try:
        result = automator_runner.run(
            f"""
            defaults: {{retry: {{attempts: 1}}}}
            steps:
              - {{id: src, uses: http.fetch, with: {{url: "{httpserver.url_for("/slow")}", timeout: 200ms}}}}
              - {{id: out, uses: test.deliver}}
            """
        )
    finally:
        release.set()

    assert result.status == "failed"
    assert "timed out" in (result.error or "") or "timeout" in (result.error or "").lower()


# --- verify_tls: a real HTTPS server with a self-signed certificate -------------------------


def self_signed(folder: Path) -> ssl.SSLContext:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[HTTPServer]:
    server = HTTPServer(host="localhost", ssl_context=self_signed(tmp_path))
    server.start()
    yield server
    server.clear()
    server.stop()


@covers(FETCH, "verify_tls", absent=True)
def test_by_default_an_untrusted_certificate_fails_the_fetch(
    automator_runner: WorkflowRunner, https_server: HTTPServer
) -> None:
    https_server.expect_request("/x").respond_with_json([{"id": 1}])

    result = run(automator_runner, f'{{url: "{https_server.url_for("/x")}"}}')

    assert result.status == "failed"
    assert "CERTIFICATE_VERIFY_FAILED" in (result.error or "") or "certificate" in (result.error or "").lower()


@covers(FETCH, "verify_tls", absent=False)
def test_verify_tls_false_accepts_it(automator_runner: WorkflowRunner, https_server: HTTPServer) -> None:
    https_server.expect_request("/x").respond_with_json([{"id": 1}])

    result = run(automator_runner, f'{{url: "{https_server.url_for("/x")}", verify_tls: false}}')

    assert result.status == "succeeded", result.error
    assert result.delivered["out"] == [{"id": 1}]
