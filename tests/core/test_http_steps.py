"""http.fetch and webhook.deliver against real HTTP servers on loopback."""

from __future__ import annotations

import json
import time
from pathlib import Path

from werkzeug import Request, Response

FEED = """<?xml version="1.0"?>
<rss version="2.0"><channel><title>news</title>
<item><guid>a1</guid><title>First</title><link>https://example.com/1</link><description>one</description></item>
<item><guid>a2</guid><title>Second</title><link>https://example.com/2</link><description>two</description></item>
</channel></rss>"""


def fetch_workflow(write_workflow, url: str, extra: str = "", attempts: int = 2) -> Path:
    return write_workflow(
        f"""
        defaults: {{retry: {{attempts: {attempts}, backoff: 10ms, max_backoff: 20ms}}}}
        steps:
          - id: get
            uses: http.fetch
            with:
              url: "{url}"
              {extra}
          - id: write
            uses: file.deliver
            with: {{path: out.jsonl}}
        """
    )


def test_json_items_from_a_nested_path_with_headers_and_params(cli, write_workflow, httpserver) -> None:
    httpserver.expect_request("/api/tickets", query_string="status=new", headers={"X-Team": "ops"}).respond_with_json(
        {"data": {"tickets": [{"id": 1}, {"id": 2}, {"id": 3}]}}
    )
    path = fetch_workflow(
        write_workflow,
        httpserver.url_for("/api/tickets"),
        "items: data.tickets\n              params: {status: new}\n              headers: {X-Team: ops}",
    )
    run = cli("run", path, "--json").json()
    assert run["status"] == "succeeded", run
    assert run["items"]["delivered"] == 3
    assert [json.loads(x)["id"] for x in (path.parent / "out.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_wrong_items_path_names_what_is_there(cli, write_workflow, httpserver) -> None:
    httpserver.expect_request("/api").respond_with_json({"results": []})
    path = fetch_workflow(write_workflow, httpserver.url_for("/api"), "items: data.tickets")
    run = cli("run", path, "--json").json()
    assert run["status"] == "failed"
    assert "no 'data' at the top level (keys there: results)" in run["error"]
    assert len(httpserver.log) == 1  # not worth retrying


def test_a_500_is_retried_then_the_run_fails_with_the_status(cli, write_workflow, httpserver) -> None:
    httpserver.expect_request("/api").respond_with_data("database down", status=500)
    path = fetch_workflow(write_workflow, httpserver.url_for("/api"), attempts=3)
    result = cli("run", path, "--json")
    run = result.json()
    assert result.exit_code == 1
    assert run["error_step"] == "get"
    assert "answered 500 INTERNAL SERVER ERROR: database down" in run["error"]
    assert len(httpserver.log) == 3
    attempts = cli("runs", "show", str(run["id"]), "--json").json()["steps"]
    assert [(s["step_id"], s["attempt"], s["status"]) for s in attempts] == [
        ("get", 1, "failed"),
        ("get", 2, "failed"),
        ("get", 3, "failed"),
    ]
    assert all("answered 500" in s["error"] for s in attempts)


def test_a_500_then_success_recovers(cli, write_workflow, httpserver) -> None:
    httpserver.expect_ordered_request("/api").respond_with_data("busy", status=503)
    httpserver.expect_ordered_request("/api").respond_with_json([{"id": 7}])
    path = fetch_workflow(write_workflow, httpserver.url_for("/api"), attempts=3)
    run = cli("run", path, "--json").json()
    assert run["status"] == "succeeded" and run["items"]["delivered"] == 1


def test_a_slow_server_times_out(cli, write_workflow, httpserver) -> None:
    def slow(_request: Request) -> Response:
        time.sleep(1.0)
        return Response("[]", content_type="application/json")

    httpserver.expect_request("/slow").respond_with_handler(slow)
    path = fetch_workflow(write_workflow, httpserver.url_for("/slow"), "timeout: 200ms", attempts=1)
    run = cli("run", path, "--json").json()
    assert run["status"] == "failed"
    assert run["error"].endswith("/slow timed out after 0.2s")


def test_non_json_where_json_was_expected(cli, write_workflow, httpserver) -> None:
    httpserver.expect_request("/html").respond_with_data("<html>login</html>", content_type="application/json")
    path = fetch_workflow(write_workflow, httpserver.url_for("/html"))
    run = cli("run", path, "--json").json()
    assert run["status"] == "failed"
    assert "the response is not JSON (content-type application/json; starts '<html>login</html>')" in run["error"]


def test_rss_and_text(cli, write_workflow, httpserver) -> None:
    httpserver.expect_request("/feed").respond_with_data(FEED, content_type="application/rss+xml")
    path = fetch_workflow(write_workflow, httpserver.url_for("/feed"))
    run = cli("run", path, "--json").json()
    rows = [json.loads(x) for x in (path.parent / "out.jsonl").read_text().splitlines()]
    assert run["items"]["delivered"] == 2
    assert [(r["id"], r["title"], r["link"]) for r in rows] == [
        ("a1", "First", "https://example.com/1"),
        ("a2", "Second", "https://example.com/2"),
    ]
    httpserver.expect_request("/text").respond_with_data("line one\nline two\n", content_type="text/plain")
    path = fetch_workflow(write_workflow, httpserver.url_for("/text"), "format: lines")
    cli("run", path)
    assert [json.loads(x)["line"] for x in (path.parent / "out.jsonl").read_text().splitlines()] == [
        "line one",
        "line two",
    ]


def test_webhook_500_then_200_is_delivered_once_with_one_idempotency_key(cli, write_workflow, httpserver) -> None:
    seen: list[tuple[str, dict]] = []
    answers = iter([500, 200, 200])

    def hook(request: Request) -> Response:
        seen.append((request.headers["Idempotency-Key"], request.get_json()))
        return Response("ok", status=next(answers))

    httpserver.expect_request("/hook", method="POST").respond_with_handler(hook)
    path = write_workflow(
        f"""
        name: notify
        steps:
          - id: read
            uses: file.fetch
            with: {{path: items.jsonl}}
            key: "{{{{ item.id }}}}"
          - id: post
            uses: webhook.deliver
            retry: {{attempts: 3, backoff: 10ms, max_backoff: 20ms}}
            concurrency: 1
            with:
              url: "{httpserver.url_for("/hook")}"
              body: {{text: "[{{{{ item.kind }}}}] {{{{ item.title }}}}", id: "{{{{ item.id }}}}"}}
        """
    )
    (path.parent / "items.jsonl").write_text(
        '{"id": 1, "kind": "bug", "title": "crash"}\n{"id": 2, "kind": "x", "title": "y"}\n'
    )
    run = cli("run", path, "--json").json()
    assert run["status"] == "succeeded"
    assert run["items"]["delivered"] == 2
    assert seen[0][1] == {"text": "[bug] crash", "id": 1}
    keys = [k for k, _ in seen]
    assert keys[0] == keys[1] != keys[2]  # the retry carried the same key
    delivered_once = {k for k, _ in seen}
    assert len(delivered_once) == 2

    # the same items again: already delivered, so nothing is sent twice
    again = cli("run", path, "--json").json()
    assert again["items"]["skipped"] == 2 and len(seen) == 3


def test_a_4xx_webhook_is_not_retried_and_fails_the_item(cli, write_workflow, httpserver) -> None:
    httpserver.expect_request("/hook").respond_with_data("bad payload", status=422)
    path = write_workflow(
        f"""
        steps:
          - id: read
            uses: file.fetch
            with: {{path: items.jsonl}}
          - id: post
            uses: webhook.deliver
            with: {{url: "{httpserver.url_for("/hook")}"}}
        """
    )
    (path.parent / "items.jsonl").write_text('{"id": 1}\n')
    run = cli("run", path, "--json").json()
    assert run["items"]["failed"] == 1
    assert len(httpserver.log) == 1
    assert "answered 422 UNPROCESSABLE ENTITY: bad payload" in run["error"]


def test_the_chat_sample_posts_each_urgent_ticket_once(cli, httpserver, monkeypatch) -> None:
    from tests.conftest import REPO

    tickets = {
        "tickets": [
            {"id": 1, "subject": "refund", "priority": "urgent"},
            {"id": 2, "subject": "font", "priority": "low"},
            {"id": 3, "subject": "outage", "priority": "high"},
        ]
    }
    httpserver.expect_request(
        "/api/tickets", query_string="status=new", headers={"Authorization": "Bearer t0ken-abc"}
    ).respond_with_json(tickets)
    posted: list[dict] = []

    def chat(request: Request) -> Response:
        posted.append(request.get_json())
        return Response("ok")

    httpserver.expect_request("/chat", method="POST").respond_with_handler(chat)
    monkeypatch.setenv("AUTOMATOR_SECRET_HELPDESK_TOKEN", "t0ken-abc")
    monkeypatch.setenv("AUTOMATOR_SECRET_CHAT_WEBHOOK", httpserver.url_for("/chat"))
    sample = REPO / "workflows" / "urgent-tickets-to-chat.yaml"
    helpdesk = httpserver.url_for("").rstrip("/")
    run = cli("run", sample, "--param", f"helpdesk={helpdesk}", "--json").json()
    assert run["items"] == {"fetched": 3, "delivered": 2, "skipped": 1, "quarantined": 0, "failed": 0}
    assert sorted(p["text"] for p in posted) == [
        f"[high] outage — {helpdesk}/tickets/3",
        f"[urgent] refund — {helpdesk}/tickets/1",
    ]
    again = cli("run", sample, "--param", f"helpdesk={helpdesk}", "--json").json()
    assert again["items"]["skipped"] == 3
    assert len(posted) == 2


def test_on_failure_steps_tell_someone_when_a_run_fails(cli, httpserver, monkeypatch) -> None:
    from tests.conftest import REPO

    httpserver.expect_request("/api/tickets").respond_with_data("maintenance", status=503)
    notices: list[dict] = []

    def chat(request: Request) -> Response:
        notices.append(request.get_json())
        return Response("ok")

    httpserver.expect_request("/chat", method="POST").respond_with_handler(chat)
    monkeypatch.setenv("AUTOMATOR_SECRET_HELPDESK_TOKEN", "t0ken-abc")
    monkeypatch.setenv("AUTOMATOR_SECRET_CHAT_WEBHOOK", httpserver.url_for("/chat"))
    text = (REPO / "workflows" / "urgent-tickets-to-chat.yaml").read_text()
    from tempfile import TemporaryDirectory

    with TemporaryDirectory() as folder:
        quick = Path(folder) / "chat.yaml"
        quick.write_text(text.replace("backoff: 2s, max_backoff: 1m", "backoff: 10ms, max_backoff: 10ms"))
        run = cli("run", quick, "--param", f"helpdesk={httpserver.url_for('').rstrip('/')}", "--json").json()
    assert run["status"] == "failed"
    assert len(notices) == 1
    assert notices[0]["text"].startswith(
        f"automator: urgent-tickets-to-chat run {run['id']} failed: step tickets (http.fetch) failed: GET "
    )
    assert "answered 503 SERVICE UNAVAILABLE: maintenance" in notices[0]["text"]
    steps = cli("runs", "show", str(run["id"]), "--json").json()["steps"]
    assert steps[-1]["step_id"] == "tell-ops" and steps[-1]["status"] == "succeeded"


def _received_queries(httpserver) -> list[str]:
    return [request.query_string.decode() for request, _response in httpserver.log]


def test_the_query_string_of_the_url_is_sent_without_params(cli, write_workflow, httpserver) -> None:
    # the README's own example: `url: ...?status=new` must fetch the new tickets only
    httpserver.expect_request("/api/tickets").respond_with_json([{"id": 1}])
    path = fetch_workflow(write_workflow, httpserver.url_for("/api/tickets") + "?status=new&team=ops")
    run = cli("run", path, "--json").json()
    assert run["status"] == "succeeded", run
    assert _received_queries(httpserver) == ["status=new&team=ops"]


def test_params_are_added_to_the_query_string_of_the_url(cli, write_workflow, httpserver) -> None:
    httpserver.expect_request("/api/tickets").respond_with_json([{"id": 1}])
    path = fetch_workflow(
        write_workflow,
        httpserver.url_for("/api/tickets") + "?status=new&page=1",
        "params: {page: 2, tag: [a, b]}",
    )
    run = cli("run", path, "--json").json()
    assert run["status"] == "succeeded", run
    # the url's own names stay; a name in both takes the value from params
    assert _received_queries(httpserver) == ["status=new&page=2&tag=a&tag=b"]


def test_a_webhook_url_keeps_its_query_string(cli, write_workflow, httpserver) -> None:
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    path = write_workflow(
        f"""
        steps:
          - id: read
            uses: file.fetch
            with: {{path: items.jsonl}}
          - id: post
            uses: webhook.deliver
            with: {{url: "{httpserver.url_for("/hook")}?token=abc&channel=ops"}}
        """
    )
    (path.parent / "items.jsonl").write_text('{"id": 1}\n')
    run = cli("run", path, "--json").json()
    assert run["status"] == "succeeded", run
    assert _received_queries(httpserver) == ["token=abc&channel=ops"]
