"""`automator run --dry-run` goes through the run's own pipeline and drivers: what it counts
is what the run then does, and it sends nothing, delivers nothing and writes nothing."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

from pytest_httpserver import HTTPServer
from sqlalchemy import create_engine, inspect, text

from automator import hookimpl
from automator.history.store import History
from automator.llm.estimate import Estimate, estimate
from automator.plugins.manager import load_plugins
from automator.spec.loader import load_workflow
from tests.llm.fake_openai import FakeOpenAI

FLOW = """
name: dry-vs-real
steps:
  - id: tickets
    uses: file.fetch
    with: {{path: items.jsonl}}
    key: "{{{{ item.id }}}}"
    only_new: true
  - id: shape
    uses: template.transform
    with:
      mapping: {{text: "{{{{ item.subject }}}}: {{{{ item.body }}}}"}}
      merge: true
  - id: well-formed
    uses: schema.validate
    with:
      schema: {{required: [priority], properties: {{priority: {{type: integer}}}}}}
      on_invalid: quarantine
  - id: classify
    uses: openai.transform
    with:
      instructions: Classify the ticket.
      input: "{{{{ item.text }}}}"
      output: {{schema: {{category: [billing, bug, other]}}}}
      max_output_tokens: 50
  - id: notify
    uses: webhook.deliver
    with:
      url: "{url}"
      body: {{ticket: "{{{{ steps.tickets.id }}}}", category: "{{{{ item.category }}}}"}}
"""


def ticket(ident: int, *, valid: bool = True) -> dict[str, Any]:
    # an invalid ticket's priority is a word: the schema step quarantines it
    return {
        "id": ident,
        "subject": f"ticket {ident}",
        "body": "my invoice is wrong",
        "priority": 2 if valid else "high",
    }


def write_items(folder: Path, items: list[dict[str, Any]]) -> None:
    (folder / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")


def history_rows(history_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the history (but the schema's version)."""
    engine = create_engine(history_url)
    try:
        with engine.connect() as db:
            tables = inspect(db).get_table_names()
            return {
                t: sorted((tuple(row) for row in db.execute(text(f'SELECT * FROM "{t}"'))), key=repr)
                for t in tables
                if t != "alembic_version"
            }
    finally:
        engine.dispose()


class Listener:
    """A plugin that hears every lifecycle event."""

    def __init__(self) -> None:
        self.heard: list[object] = []

    @hookimpl
    def run_started(self, event: object) -> None:
        self.heard.append(event)

    @hookimpl
    def run_finished(self, event: object) -> None:
        self.heard.append(event)

    @hookimpl
    def step_started(self, event: object) -> None:
        self.heard.append(event)

    @hookimpl
    def step_finished(self, event: object) -> None:
        self.heard.append(event)

    @hookimpl
    def item_outcome(self, event: object) -> None:
        self.heard.append(event)


def dry(path: Path, history_url: str) -> Estimate:
    """The dry run through the Python API: it also says what the items would end as.

    A listener plugin hears nothing: a dry run is not a run."""
    listener = Listener()
    plugins = load_plugins(None, extra=[(listener, "listener")])
    history = History(history_url)
    try:
        found = asyncio.run(estimate(load_workflow(path, plugins), history, plugins))
    finally:
        history.close()
    assert listener.heard == []
    return found


def ledger(cli: Any, run_id: int) -> list[dict[str, Any]]:
    shown = cli("runs", "show", str(run_id), "--json")
    assert shown.exit_code == 0, shown.stderr
    return shown.json()["ledger"]


def test_dry_run_counts_what_the_run_then_does(
    fake_openai: FakeOpenAI, cli: Any, workflow_dir: Path, history_url: str, httpserver: HTTPServer
) -> None:
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    path = workflow_dir / "flow.yaml"
    path.write_text(textwrap.dedent(FLOW.format(url=httpserver.url_for("/hook"))).lstrip(), encoding="utf-8")
    # ten tickets, two of them invalid, and ticket 5 fetched twice (the run skips the repeat)
    first = [ticket(i, valid=i not in (3, 7)) for i in range(1, 11)] + [ticket(5)]
    write_items(workflow_dir, first)

    shown = cli("run", path, "--dry-run", "--json")
    assert shown.exit_code == 0, shown.stderr
    found = shown.json()
    assert found["fetched"] == 11 and found["already_delivered"] == 0
    (classify,) = found["steps"]
    assert classify["step"] == "classify" and classify["items"] == 8  # not the invalid two, not the repeat
    assert classify["max_output_tokens"] == 8 * 50
    # nothing sent, nothing delivered, nothing recorded
    assert fake_openai.requests == []
    assert httpserver.log == []
    assert all(rows == [] for rows in history_rows(history_url).values()), history_rows(history_url)

    counted = dry(path, history_url)
    assert counted.as_json() == found
    assert counted.deliveries == {"notify": 8}

    run = cli("run", path, "--json")
    assert run.exit_code == 0, run.stdout
    done = run.json()
    assert len(fake_openai.completions) == classify["items"]
    assert len(httpserver.log) == counted.deliveries["notify"]
    assert done["items"] == {"fetched": counted.fetched, **counted.outcomes}

    # the next poll: the same ten tickets and four new ones, one of them invalid
    write_items(workflow_dir, [ticket(i, valid=i not in (3, 7, 12)) for i in range(1, 15)])
    fake_openai.reset()
    httpserver.clear_log()
    before = history_rows(history_url)
    again = cli("run", path, "--dry-run", "--json")
    assert again.exit_code == 0, again.stderr
    estimated = again.json()
    assert history_rows(history_url) == before  # a dry run writes nothing, not even beside a real run
    assert fake_openai.requests == [] and httpserver.log == []
    assert estimated["fetched"] == 14 and estimated["already_delivered"] == 8
    counted = dry(path, history_url)
    assert counted.as_json() == estimated

    second = cli("run", path, "--json")
    assert second.exit_code == 0, second.stderr
    items = ledger(cli, second.json()["id"])
    skipped = [i for i in items if i["outcome"] == "skipped" and i["reason"].startswith("already delivered")]
    assert len(skipped) == estimated["already_delivered"]
    assert len(fake_openai.completions) == estimated["steps"][0]["items"] == 3  # tickets 11, 13 and 14
    assert len(httpserver.log) == counted.deliveries["notify"] == 3
    assert second.json()["items"] == {"fetched": counted.fetched, **counted.outcomes}


def test_a_dry_run_ends_items_the_model_step_would_not_send(
    fake_openai: FakeOpenAI, cli: Any, workflow_dir: Path, history_url: str, httpserver: HTTPServer
) -> None:
    """An item too long for the model's context is quarantined by the run: the dry run says so,
    and a second model step does not count it."""
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    text = textwrap.dedent(FLOW.format(url=httpserver.url_for("/hook"))).lstrip()
    text = text.replace("      max_output_tokens: 50\n", "      max_output_tokens: 50\n      context_window: 400\n")
    text = text.replace(
        "  - id: notify\n",
        "  - id: again\n    uses: openai.transform\n    with:\n      instructions: Again.\n"
        '      input: "{{ steps.shape.text }}"\n      output: {schema: {category: [billing, bug, other]}}\n'
        "      max_output_tokens: 50\n  - id: notify\n",
    )
    path = workflow_dir / "flow.yaml"
    path.write_text(text, encoding="utf-8")
    long = {**ticket(2), "body": "invoice " * 600}
    write_items(workflow_dir, [ticket(1), long, ticket(3)])

    counted = dry(path, history_url)
    classify, again = counted.steps
    assert classify.items == 2 and sum(classify.not_sent.values()) == 1
    assert again.items == 2  # the long ticket ended at classify, as in the run
    assert counted.outcomes["quarantined"] == 1
    assert fake_openai.requests == [] and httpserver.log == []

    run = cli("run", path, "--json")
    assert run.exit_code == 0, run.stdout
    assert run.json()["items"] == {"fetched": counted.fetched, **counted.outcomes}
    assert len(fake_openai.completions) == classify.items + again.items


def test_a_dry_run_stops_where_the_run_would(
    fake_openai: FakeOpenAI, cli: Any, workflow_dir: Path, history_url: str, httpserver: HTTPServer
) -> None:
    """With ``on_item_error: stop``, an item that fails stops the run: the dry run says so."""
    text = textwrap.dedent(FLOW.format(url=httpserver.url_for("/hook"))).lstrip()
    path = workflow_dir / "flow.yaml"
    path.write_text(text.replace("name: dry-vs-real\n", "name: dry-vs-real\non_item_error: stop\n"), encoding="utf-8")
    write_items(workflow_dir, [ticket(1), {"id": 2, "body": "no subject"}, ticket(3)])

    shown = cli("run", path, "--dry-run")
    assert shown.exit_code == 1
    assert "on_item_error is stop" in shown.stderr and "subject" in shown.stderr, shown.stderr
    assert fake_openai.requests == [] and httpserver.log == []
    assert all(rows == [] for rows in history_rows(history_url).values())


def test_a_dry_run_leaves_a_delivered_file_alone(cli: Any, workflow_dir: Path, history_url: str) -> None:
    """A dry run delivers nothing to a file: no part is written, and the target (which
    file.deliver assembles when the step closes) stays as it was."""
    (workflow_dir / "flow.yaml").write_text(
        textwrap.dedent(
            """
            name: to-file
            steps:
              - id: tickets
                uses: file.fetch
                with: {path: items.jsonl}
              - id: out
                uses: file.deliver
                with: {path: out.jsonl}
            """
        ).lstrip(),
        encoding="utf-8",
    )
    write_items(workflow_dir, [ticket(1), ticket(2)])
    (workflow_dir / "out.jsonl").write_text('{"kept": true}\n', encoding="utf-8")
    before = sorted(p.name for p in workflow_dir.rglob("*"))

    shown = cli("run", workflow_dir / "flow.yaml", "--dry-run", "--json")
    assert shown.exit_code == 0, shown.stderr
    assert shown.json()["fetched"] == 2 and shown.json()["steps"] == []
    assert (workflow_dir / "out.jsonl").read_text(encoding="utf-8") == '{"kept": true}\n'
    assert sorted(p.name for p in workflow_dir.rglob("*")) == before


def test_a_when_that_skips_the_model_step_costs_nothing(
    fake_openai: FakeOpenAI, cli: Any, workflow_dir: Path, history_url: str, httpserver: HTTPServer
) -> None:
    """Routing: the model step takes only the tickets its ``when:`` lets in; the dry run counts
    those, and a digest after it counts one delivery per group."""
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    text = textwrap.dedent(FLOW.format(url=httpserver.url_for("/hook"))).lstrip()
    text = text.replace(
        "  - id: classify\n    uses: openai.transform\n",
        '  - id: classify\n    uses: openai.transform\n    when: "{{ item.id is even }}"\n',
    )
    text = text.replace(
        "  - id: notify\n    uses: webhook.deliver\n",
        "  - id: notify\n    uses: webhook.deliver\n    group: {size: 3}\n",
    )
    text = text.replace(
        'body: {ticket: "{{ steps.tickets.id }}", category: "{{ item.category }}"}',
        'body: {tickets: "{{ items | length }}"}',
    )
    path = workflow_dir / "flow.yaml"
    path.write_text(text, encoding="utf-8")
    write_items(workflow_dir, [ticket(i) for i in range(1, 11)])

    counted = dry(path, history_url)
    (classify,) = counted.steps
    assert classify.items == 5 and classify.max_output_tokens == 5 * 50  # the odd ones pass it by, free
    assert counted.deliveries == {"notify": 10} and counted.digests == {"notify": 4}
    assert fake_openai.requests == [] and httpserver.log == []

    run = cli("run", path, "--json")
    assert run.exit_code == 0, run.stdout
    assert len(fake_openai.completions) == classify.items
    assert len(httpserver.log) == counted.digests["notify"]
    assert run.json()["items"] == {"fetched": counted.fetched, **counted.outcomes}
