"""What a step type gets from its base class: the delivery idempotency key, typed templated settings."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pydantic import Field
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from automator import DeliverStep, FetchStep, Item, StepConfig, StepError, Templated, WorkflowFileError, hookimpl
from automator.spec.schema import workflow_json_schema
from automator.testing import WorkflowRunner

# --- a deliverer written from the guide: it sends the key the built-ins send ------------


class PostConfig(StepConfig):
    url: str = Field(description="Where to post.")


class Post(DeliverStep[PostConfig]):
    name = "acme.post"
    blocking = True

    def deliver(self, item: Item) -> None:
        response = httpx.post(
            self.config.url, json=item.data, headers={"Idempotency-Key": self.idempotency_key(item)}, timeout=10
        )
        if response.status_code >= 400:
            raise StepError(f"answered {response.status_code}")


class PostPlugin:
    @hookimpl
    def register_step_types(self, register: Any) -> None:
        register(Post)


def receiver(httpserver: HTTPServer) -> list[tuple[str, Any]]:
    received: list[tuple[str, Any]] = []

    def keep(request: Request) -> Response:
        received.append((request.headers["Idempotency-Key"], request.get_json()))
        return Response("ok")

    httpserver.expect_request("/in", method="POST").respond_with_handler(keep)
    return received


def test_a_plugin_deliverer_sends_the_same_key_as_webhook_deliver_in_every_run(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    received = receiver(httpserver)
    url = httpserver.url_for("/in")
    fetch = '{id: src, uses: test.fetch, with: {items: [{"id": 1}, {"id": 2}]}, key: "{{ item.id }}", only_new: false}'

    first = automator_runner.run(
        f"name: tickets\nsteps:\n  - {fetch}\n  - {{id: out, uses: acme.post, with: {{url: '{url}'}}}}\n",
        plugins=[PostPlugin()],
    )
    second = automator_runner.run(
        f"name: tickets\nsteps:\n  - {fetch}\n  - {{id: out, uses: acme.post, with: {{url: '{url}'}}}}\n",
        plugins=[PostPlugin()],
    )
    builtin = automator_runner.run(
        f"name: tickets\nsteps:\n  - {fetch}\n  - {{id: out, uses: webhook.deliver, with: {{url: '{url}'}}}}\n"
    )

    assert [r.status for r in (first, second, builtin)] == ["succeeded"] * 3
    assert first.run.id != second.run.id
    assert len(received) == 6
    # per item one key: the same in both runs of the plugin and in the built-in deliverer
    keys: dict[int, set[str]] = {}
    for key, body in received:
        keys.setdefault(body["id"], set()).add(key)
    assert len(keys[1]) == len(keys[2]) == 1
    assert keys[1] != keys[2]


def test_an_item_without_a_key_keeps_its_key_within_its_run_only(
    automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    received = receiver(httpserver)
    workflow = f"""
        name: keyless
        steps:
          - {{id: src, uses: test.fetch, with: {{items: [{{"n": 1}}]}}}}
          - {{id: out, uses: acme.post, with: {{url: "{httpserver.url_for("/in")}"}}}}
        """

    automator_runner.run(workflow, plugins=[PostPlugin()])
    automator_runner.run(workflow, plugins=[PostPlugin()])

    assert received[0][0] != received[1][0]  # two runs, two items as far as anyone can tell


# --- Templated[T]: typed settings that may be templates ----------------------------------


class PageConfig(StepConfig):
    pages: Templated[int] = Field(1, ge=1, le=5, description="How many pages to make.")
    prefix: Templated[str] = Field("page", description="Each page's name starts with this.")


class Pages(FetchStep[PageConfig]):
    name = "acme.pages"

    def fetch(self) -> list[dict[str, Any]]:
        return [{"n": n, "name": f"{self.config.prefix}-{n}"} for n in range(self.config.pages)]


class StampConfig(StepConfig):
    copies: Templated[int] = Field(description="How many copies of each item.")
    ratio: Templated[float] = Field(1.0, description="A factor.")


class Stamp(DeliverStep[StampConfig]):
    name = "acme.stamp"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[Any, Any]] = []

    async def deliver(self, item: Item) -> None:
        # the step reads plain typed values: the template was rendered for this item
        assert isinstance(self.config.copies, int) and isinstance(self.config.ratio, float)
        stamped.append({"n": item.data["n"], "copies": self.config.copies, "ratio": self.config.ratio})


stamped: list[dict[str, Any]] = []


class TemplatedPlugin:
    @hookimpl
    def register_step_types(self, register: Any) -> None:
        register(Pages)
        register(Stamp)


def test_typed_settings_take_templates_rendered_per_item_and_per_fetch(automator_runner: WorkflowRunner) -> None:
    stamped.clear()
    result = automator_runner.run(
        """
        params: {pages: 3}
        steps:
          - id: src
            uses: acme.pages
            with: {pages: "{{ params.pages }}", prefix: "{{ secrets.PREFIX }}"}
          - id: out
            uses: acme.stamp
            with: {copies: "{{ item.n + 1 }}", ratio: 0.5}
          - {id: kept, uses: test.deliver}
        """,
        plugins=[TemplatedPlugin()],
        secrets={"PREFIX": "leaf"},
    )

    assert result.status == "succeeded", result.error
    assert [i["name"] for i in result.delivered["kept"]] == ["leaf-0", "leaf-1", "leaf-2"]
    assert sorted(stamped, key=lambda s: s["n"]) == [
        {"n": 0, "copies": 1, "ratio": 0.5},
        {"n": 1, "copies": 2, "ratio": 0.5},
        {"n": 2, "copies": 3, "ratio": 0.5},
    ]


def test_a_templated_setting_that_renders_to_a_wrong_value_fails_its_item_naming_the_setting(
    automator_runner: WorkflowRunner,
) -> None:
    stamped.clear()
    result = automator_runner.run(
        """
        steps:
          - {id: src, uses: test.fetch, with: {items: [{"n": "two"}, {"n": 3}]}}
          - {id: out, uses: acme.stamp, with: {copies: "{{ item.n }}"}}
        """,
        plugins=[TemplatedPlugin()],
    )

    assert result.outcomes["failed"] == 1 and result.outcomes["delivered"] == 1
    [failed] = result.items_with("failed")
    assert failed.reason is not None
    assert "setting copies: the template rendered to 'two', which is not valid" in failed.reason
    assert "valid integer" in failed.reason


def test_a_templated_setting_keeps_its_constraints_after_rendering(automator_runner: WorkflowRunner) -> None:
    result = automator_runner.run(
        """
        params: {pages: 9}
        steps:
          - {id: src, uses: acme.pages, with: {pages: "{{ params.pages }}"}}
          - {id: kept, uses: test.deliver}
        """,
        plugins=[TemplatedPlugin()],
    )

    assert result.status == "failed"
    assert "setting pages: the template rendered to 9, which is not valid: Input should be less than or equal to 5" in (
        result.error or ""
    )


def test_at_load_a_templated_setting_takes_its_type_or_a_template_and_nothing_else(
    automator_runner: WorkflowRunner,
) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(
            """
            steps:
              - {id: src, uses: acme.pages, with: {pages: many}}
              - {id: out, uses: acme.stamp, with: {copies: "{{ item.n + }}"}}
            """,
            plugins=[TemplatedPlugin()],
        )

    messages = [f"{p.line}: {p.message}" for p in caught.value.problems]
    assert any(m.startswith("2: ") and "valid integer" in m for m in messages), messages
    assert any(m.startswith("3: ") and "template syntax error" in m for m in messages), messages


def test_the_schema_offers_a_templated_setting_as_its_type_or_a_template(automator_runner: WorkflowRunner) -> None:
    schema = workflow_json_schema(automator_runner.plugins([TemplatedPlugin()]))
    text = str(schema)

    assert "'pattern': '\\\\{\\\\{|\\\\{%'" in text
    assert "A template, rendered before the step runs." in text
