"""The example plugin, tested the way a plugin author would: with automator's fixtures.

``automator_runner`` comes from automator's pytest plugin (installed with automator);
``httpserver`` from pytest-httpserver, a real HTTP server on loopback.
"""

from __future__ import annotations

import json
from pathlib import Path

import automator_example
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from automator import WorkflowFileError
from automator.testing import WorkflowRunner

FEED = {
    "version": "https://jsonfeed.org/version/1.1",
    "title": "Example",
    "items": [
        {"id": "1", "title": "First post", "url": "https://example.org/1"},
        {"id": "2", "title": "A second post with a title far too long for a chat line", "url": "https://example.org/2"},
        {"id": "3", "title": "Third post", "url": "https://example.org/3"},
    ],
}

WORKFLOW = """
steps:
  - id: posts
    uses: example.jsonfeed
    with: {url: "%(feed)s", limit: %(limit)d}
    key: "{{ item.id }}"
  - id: chat
    uses: example.chat
    with:
      url: "{{ secrets.CHAT_WEBHOOK }}"
      text: "{{ item.title | example_shorten(20) }} {{ item.url }}"
"""


def workflow(httpserver: HTTPServer, limit: int = 50) -> str:
    return WORKFLOW % {"feed": httpserver.url_for("/feed.json"), "limit": limit}


@pytest.fixture
def chat(httpserver: HTTPServer) -> list[dict[str, object]]:
    """The chat webhook: records each message it receives."""
    received: list[dict[str, object]] = []

    def handler(request: Request) -> Response:
        received.append({"body": request.get_json(), "key": request.headers.get("Idempotency-Key")})
        return Response("ok")

    httpserver.expect_request("/chat", method="POST").respond_with_handler(handler)
    return received


def test_posts_each_feed_item_to_the_chat(
    automator_runner: WorkflowRunner, httpserver: HTTPServer, chat: list[dict[str, object]]
) -> None:
    httpserver.expect_request("/feed.json").respond_with_json(FEED)

    result = automator_runner.run(
        workflow(httpserver), plugins=[automator_example], secrets={"CHAT_WEBHOOK": httpserver.url_for("/chat")}
    )

    assert result.status == "succeeded", result.error
    assert result.outcomes == {"delivered": 3, "skipped": 0, "quarantined": 0, "failed": 0}
    texts = sorted(str(message["body"]["text"]) for message in chat)  # type: ignore[index]
    assert texts == [
        "A second post with… https://example.org/2",
        "First post https://example.org/1",
        "Third post https://example.org/3",
    ]
    assert len({message["key"] for message in chat}) == 3  # one idempotency key per item
    # the webhook URL came from a secret: it is in no step's record
    assert httpserver.url_for("/chat") not in json.dumps([s.error for s in result.steps])


def test_second_run_posts_only_new_items(
    automator_runner: WorkflowRunner, httpserver: HTTPServer, chat: list[dict[str, object]]
) -> None:
    httpserver.expect_request("/feed.json").respond_with_json(FEED)
    secrets = {"CHAT_WEBHOOK": httpserver.url_for("/chat")}

    automator_runner.run(workflow(httpserver), plugins=[automator_example], secrets=secrets)
    again = automator_runner.run(workflow(httpserver), plugins=[automator_example], secrets=secrets)

    assert again.outcomes["skipped"] == 3
    assert len(chat) == 3


def test_every_run_sends_an_item_with_the_same_idempotency_key(
    automator_runner: WorkflowRunner, httpserver: HTTPServer, chat: list[dict[str, object]]
) -> None:
    httpserver.expect_request("/feed.json").respond_with_json(FEED)
    secrets = {"CHAT_WEBHOOK": httpserver.url_for("/chat")}
    # only_new: false posts every item again, as a retried or resumed run would
    again = workflow(httpserver).replace('key: "{{ item.id }}"', 'key: "{{ item.id }}"\n    only_new: false')

    first = automator_runner.run(again, plugins=[automator_example], secrets=secrets)
    second = automator_runner.run(again, plugins=[automator_example], secrets=secrets)

    assert first.run.id != second.run.id and len(chat) == 6
    keys = {}
    for message in chat:
        keys.setdefault(message["body"]["text"], set()).add(message["key"])  # type: ignore[index]
    assert all(len(sent) == 1 for sent in keys.values()), keys


def test_the_limit_may_come_from_a_parameter(
    automator_runner: WorkflowRunner, httpserver: HTTPServer, chat: list[dict[str, object]]
) -> None:
    httpserver.expect_request("/feed.json").respond_with_json(FEED)
    text = "params: {limit: 2}\n" + workflow(httpserver).replace("limit: 50", 'limit: "{{ params.limit }}"')

    result = automator_runner.run(
        text, plugins=[automator_example], secrets={"CHAT_WEBHOOK": httpserver.url_for("/chat")}
    )

    assert [item.key for item in result.items] == ["1", "2"]


def test_limit_keeps_the_newest_items(
    automator_runner: WorkflowRunner, httpserver: HTTPServer, chat: list[dict[str, object]]
) -> None:
    httpserver.expect_request("/feed.json").respond_with_json(FEED)

    result = automator_runner.run(
        workflow(httpserver, limit=1),
        plugins=[automator_example],
        secrets={"CHAT_WEBHOOK": httpserver.url_for("/chat")},
    )

    assert [item.key for item in result.items] == ["1"]


def test_a_chat_that_rejects_the_message_fails_the_item_not_the_feed(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    httpserver.expect_request("/feed.json").respond_with_json(FEED)
    httpserver.expect_request("/chat").respond_with_data("no", status=403)

    result = automator_runner.run(
        workflow(httpserver), plugins=[automator_example], secrets={"CHAT_WEBHOOK": httpserver.url_for("/chat")}
    )

    assert result.status == "failed"
    assert result.outcomes["failed"] == 3
    assert {item.reason for item in result.items_with("failed")} == {"chat webhook answered 403"}


def test_a_page_that_is_not_a_feed_fails_the_run(automator_runner: WorkflowRunner, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/feed.json").respond_with_json({"hello": "world"})

    result = automator_runner.run(workflow(httpserver), plugins=[automator_example], secrets={"CHAT_WEBHOOK": "x"})

    assert result.status == "failed"
    assert "not a JSON Feed" in (result.error or "")
    assert result.step("posts").status == "failed"


def test_secrets_file_provides_the_webhook(
    automator_runner: WorkflowRunner,
    httpserver: HTTPServer,
    chat: list[dict[str, object]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    httpserver.expect_request("/feed.json").respond_with_json(FEED)
    secrets_file = tmp_path / "secrets.json"
    secrets_file.write_text(json.dumps({"CHAT_WEBHOOK": httpserver.url_for("/chat")}))
    monkeypatch.setenv(automator_example.SECRETS_FILE_VARIABLE, str(secrets_file))

    result = automator_runner.run(workflow(httpserver), plugins=[automator_example])

    assert result.outcomes["delivered"] == 3
    assert len(chat) == 3


def test_config_mistakes_are_reported_at_their_line(automator_runner: WorkflowRunner) -> None:
    text = """
steps:
  - id: posts
    uses: example.jsonfeed
    with: {url: "not a url", limit: 0}
  - {id: out, uses: test.deliver}
"""
    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(text, plugins=[automator_example])

    assert {(p.line, p.message.split(":")[0]) for p in caught.value.problems} == {(4, "url"), (4, "limit")}


def test_shorten() -> None:
    assert automator_example.shorten("short") == "short"
    assert automator_example.shorten("a  b\nc", 80) == "a b c"
    assert automator_example.shorten("abcdefghij", 5) == "abcd…"


def test_installed_through_its_entry_point(automator_runner: WorkflowRunner) -> None:
    plugins = automator_runner.plugins()  # built-ins and installed plugins only

    info = plugins.infos["example"]
    assert info.source == "entry point"
    assert info.version == "0.1.0"
    assert sorted(s.name for s in info.steps) == ["example.chat", "example.jsonfeed"]
    assert info.template_filters == ["example_shorten"]


def test_editors_see_its_settings_in_the_schema(automator_runner: WorkflowRunner) -> None:
    from automator.spec.schema import workflow_json_schema

    schema = workflow_json_schema(automator_runner.plugins())

    config = schema["$defs"]["config.example.jsonfeed"]
    assert config["properties"]["url"]["description"] == "The JSON Feed (https://jsonfeed.org) to read."
    assert config["required"] == ["url"]
    assert "example.chat" in schema["$defs"]["StepSpec"]["properties"]["uses"]["enum"]
