"""template.transform, schema.validate and webhook.deliver, every setting left out and set."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from automator import WorkflowFileError
from automator.testing import WorkflowRunner
from tests.steps.coverage import covers

TEMPLATE, SCHEMA, WEBHOOK = "template.transform", "schema.validate", "webhook.deliver"
ITEMS = [{"id": 1, "title": " Disk full ", "urgency": 5}, {"id": 2, "title": "Typo", "urgency": 2}]


def through(runner: WorkflowRunner, step: str, items: list[Any] = ITEMS, **kwargs: Any) -> Any:
    return runner.run(
        f"""
        params: {{prefix: "#"}}
        steps:
          - {{id: src, uses: test.fetch, with: {{items: {json.dumps(items)}}}, key: "{{{{ item.id }}}}", only_new: false}}
          - {step}
          - {{id: out, uses: test.deliver}}
        """,
        **kwargs,
    )


# --- template.transform ---------------------------------------------------------------------


@covers(TEMPLATE, "mapping", "template", absent=True)
def test_a_template_transform_needs_a_mapping_or_a_template(automator_runner: WorkflowRunner) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(
            "steps:\n  - {id: src, uses: test.fetch}\n  - {id: t, uses: template.transform, with: {merge: true}}\n"
        )

    assert any("give exactly one of mapping or template" in p.message for p in caught.value.problems)


@covers(TEMPLATE, "mapping", "into", "merge", absent=True)
@covers(TEMPLATE, "mapping", absent=False)
def test_a_mapping_becomes_the_new_item(automator_runner: WorkflowRunner) -> None:
    result = through(
        automator_runner,
        '{id: t, uses: template.transform, with: {mapping: {ref: "{{ params.prefix }}{{ item.id }}", '
        'title: "{{ item.title | trim }}", urgent: "{{ item.urgency >= 4 }}", source: helpdesk}}}',
    )

    # into: null and merge: false -> the mapping replaces the item; a lone expression keeps its type
    assert result.delivered["out"] == [
        {"ref": "#1", "title": "Disk full", "urgent": True, "source": "helpdesk"},
        {"ref": "#2", "title": "Typo", "urgent": False, "source": "helpdesk"},
    ]


@covers(TEMPLATE, "template", absent=False)
@covers(TEMPLATE, "into", absent=True)
def test_a_template_result_that_is_not_an_object_goes_under_text(automator_runner: WorkflowRunner) -> None:
    text = through(automator_runner, '{id: t, uses: template.transform, with: {template: "[{{ item.id }}]"}}')
    whole = through(automator_runner, '{id: t, uses: template.transform, with: {template: "{{ item }}"}}')

    assert text.delivered["out"] == [{"text": "[1]"}, {"text": "[2]"}]
    assert whole.delivered["out"] == ITEMS  # an object result is the item


@covers(TEMPLATE, "into", "merge", absent=False)
def test_into_and_merge_keep_the_item(automator_runner: WorkflowRunner) -> None:
    into = through(
        automator_runner, '{id: t, uses: template.transform, with: {template: "{{ item.urgency * 2 }}", into: score}}'
    )
    merged = through(
        automator_runner, "{id: t, uses: template.transform, with: {mapping: {urgency: 0, seen: true}, merge: true}}"
    )

    assert into.delivered["out"] == [{**ITEMS[0], "score": 10}, {**ITEMS[1], "score": 4}]
    assert merged.delivered["out"] == [
        {**ITEMS[0], "urgency": 0, "seen": True},
        {**ITEMS[1], "urgency": 0, "seen": True},
    ]


# --- schema.validate ------------------------------------------------------------------------

URGENT = "{properties: {urgency: {minimum: 4}}}"


@covers(SCHEMA, "schema", absent=True)
def test_schema_is_required(automator_runner: WorkflowRunner) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(
            "steps:\n  - {id: src, uses: test.fetch}\n  - {id: v, uses: schema.validate, with: {on_invalid: skip}}\n"
        )

    assert any("missing required key 'schema'" in p.message for p in caught.value.problems)


@covers(SCHEMA, "schema", absent=False)
@covers(SCHEMA, "on_invalid", absent=True)
def test_by_default_an_invalid_item_is_quarantined_with_the_reason(automator_runner: WorkflowRunner) -> None:
    result = through(automator_runner, f"{{id: v, uses: schema.validate, with: {{schema: {URGENT}}}}}")

    assert result.delivered["out"] == [ITEMS[0]]
    [kept] = result.items_with("quarantined")
    assert (kept.key, kept.step_id, kept.reason) == ("2", "v", "urgency: 2 is less than the minimum of 4")


@pytest.mark.parametrize(
    ("on_invalid", "outcome", "reason"), [("skip", "skipped", "invalid: "), ("fail", "failed", "invalid: ")]
)
@covers(SCHEMA, "on_invalid", absent=False)
def test_on_invalid_skip_or_fail(automator_runner: WorkflowRunner, on_invalid: str, outcome: str, reason: str) -> None:
    result = through(
        automator_runner, f"{{id: v, uses: schema.validate, with: {{schema: {URGENT}, on_invalid: {on_invalid}}}}}"
    )

    [ended] = result.items_with(outcome)
    assert ended.reason == f"{reason}urgency: 2 is less than the minimum of 4"
    assert result.step("v").retries == 0


# --- webhook.deliver ------------------------------------------------------------------------


def receiver(httpserver: HTTPServer, path: str = "/hook", status: int = 200) -> list[Request]:
    seen: list[Request] = []

    def keep(request: Request) -> Response:
        request.get_data()
        seen.append(request)
        return Response("ok", status=status)

    httpserver.expect_request(path).respond_with_handler(keep)
    return seen


@covers(WEBHOOK, "url", absent=True)
def test_webhook_url_is_required(automator_runner: WorkflowRunner) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(
            "steps:\n  - {id: src, uses: test.fetch}\n  - {id: w, uses: webhook.deliver, with: {method: PUT}}\n"
        )

    assert any("missing required key 'url'" in p.message for p in caught.value.problems)


@covers(WEBHOOK, "url", absent=False)
@covers(WEBHOOK, "method", "headers", "body", "idempotency_header", "timeout", absent=True)
def test_with_only_a_url_it_posts_each_item_with_an_idempotency_key(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    answer = threading.Event()
    seen: list[Request] = []

    def slow(request: Request) -> Response:
        request.get_data()
        seen.append(request)
        answer.wait(1.0)  # a second: well inside the 30s default timeout
        return Response("ok")

    httpserver.expect_request("/hook").respond_with_handler(slow)

    runs = [
        automator_runner.run(
            f"""
            name: hooks
            steps:
              - {{id: src, uses: test.fetch, with: {{items: {json.dumps(ITEMS)}}}, key: "{{{{ item.id }}}}", only_new: false}}
              - {{id: w, uses: webhook.deliver, with: {{url: "{httpserver.url_for("/hook")}"}}}}
            """
        )
        for _ in range(2)
    ]

    assert [r.status for r in runs] == ["succeeded", "succeeded"], runs[0].error
    assert {r.method for r in seen} == {"POST"}
    bodies = sorted((json.loads(r.get_data()) for r in seen[:2]), key=json.dumps)
    assert bodies == sorted(ITEMS, key=json.dumps)  # the item itself
    assert all(r.headers["Content-Type"] == "application/json" for r in seen)
    keys = [r.headers["Idempotency-Key"] for r in seen]
    assert len(set(keys[:2])) == 2 and set(keys[:2]) == set(keys[2:])  # per item, the same in every run


@covers(WEBHOOK, "method", "headers", "body", "idempotency_header", absent=False)
def test_method_headers_body_and_key_header(automator_runner: WorkflowRunner, httpserver: HTTPServer) -> None:
    seen = receiver(httpserver)
    url = httpserver.url_for("/hook")

    custom = through(
        automator_runner,
        f'{{id: w, uses: webhook.deliver, with: {{url: "{url}", method: PUT, '
        'headers: {Authorization: "Bearer {{ secrets.HOOK }}", X-Item: "{{ item.id }}"}, '
        'body: {text: "{{ params.prefix }}{{ item.id }} {{ item.title | trim }}", n: "{{ item.urgency }}"}, '
        "idempotency_header: X-Dedupe}}",
        items=ITEMS[:1],
        secrets={"HOOK": "h00k-secret"},
    )
    unkeyed = through(
        automator_runner,
        f'{{id: w, uses: webhook.deliver, with: {{url: "{url}", idempotency_header: null}}}}',
        items=ITEMS[:1],
    )

    assert custom.status == unkeyed.status == "succeeded"
    first, second = seen
    assert first.method == "PUT"
    assert (first.headers["Authorization"], first.headers["X-Item"]) == ("Bearer h00k-secret", "1")
    assert json.loads(first.get_data()) == {"text": "#1 Disk full", "n": 5}
    assert len(first.headers["X-Dedupe"]) == 32 and "Idempotency-Key" not in first.headers
    assert "Idempotency-Key" not in second.headers and "X-Dedupe" not in second.headers


@covers(WEBHOOK, "timeout", absent=False)
def test_a_short_webhook_timeout_fails_the_item(automator_runner: WorkflowRunner, httpserver: HTTPServer) -> None:
    release = threading.Event()

    def slow(request: Request) -> Response:
        release.wait(5)
        return Response("ok")

    httpserver.expect_request("/hook").respond_with_handler(slow)
    try:
        result = automator_runner.run(
            f"""
            steps:
              - {{id: src, uses: test.fetch, with: {{items: [{{"n": 1}}]}}}}
              - id: w
                uses: webhook.deliver
                retry: {{attempts: 1}}
                with: {{url: "{httpserver.url_for("/hook")}", timeout: 200ms}}
            """
        )
    finally:
        release.set()

    [failed] = result.items_with("failed")
    assert "timed out" in (failed.reason or "") or "timeout" in (failed.reason or "").lower()
