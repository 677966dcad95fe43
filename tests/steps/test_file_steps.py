"""file.fetch and file.deliver, every setting left out and set: real files in, real files out."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

import pytest

from automator import WorkflowFileError
from automator.testing import WorkflowRunner
from tests.steps.coverage import covers

FETCH, DELIVER = "file.fetch", "file.deliver"


def fetch(runner: WorkflowRunner, settings: str) -> Any:
    return runner.run(
        f"""
        steps:
          - id: src
            uses: file.fetch
            with: {settings}
          - {{id: out, uses: test.deliver}}
        """
    )


# --- file.fetch -------------------------------------------------------------------------------


@covers(FETCH, "path", absent=True)
@covers(DELIVER, "path", absent=True)
@pytest.mark.parametrize("step_type", [FETCH, DELIVER])
def test_path_is_required(automator_runner: WorkflowRunner, step_type: str) -> None:
    first = "" if step_type == FETCH else "  - {id: src, uses: test.fetch}\n"
    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(f"steps:\n{first}  - {{id: s, uses: {step_type}, with: {{format: auto}}}}\n")

    assert any("missing required key 'path'" in p.message for p in caught.value.problems)


@covers(FETCH, "path", "format", "items", "encoding", "delimiter", "missing_ok", "add_source", absent=True)
def test_with_only_a_path_it_reads_each_format_by_extension(automator_runner: WorkflowRunner) -> None:
    automator_runner.write("in/a.json", [{"n": 1, "name": "Zoë"}])
    automator_runner.write("in/b.jsonl", '{"n": 2}\n\n{"n": 3}\n')
    automator_runner.write("in/c.csv", "n,city\n4,Köln\n")
    automator_runner.write("in/d.ndjson", '{"n": 5}\n')

    result = fetch(automator_runner, "{path: 'in/*'}")

    assert result.status == "succeeded", result.error
    # sorted by file name; utf-8; CSV split at commas, values as text; no _source/_line
    assert result.delivered["out"] == [
        {"n": 1, "name": "Zoë"},
        {"n": 2},
        {"n": 3},
        {"n": "4", "city": "Köln"},
        {"n": 5},
    ]


@covers(FETCH, "missing_ok", absent=True)
def test_by_default_no_matching_file_fails_the_run(automator_runner: WorkflowRunner) -> None:
    result = fetch(automator_runner, "{path: 'nothing/*.json'}")

    assert result.status == "failed"
    assert "no file matches" in (result.error or "")


@covers(FETCH, "path", "format", "items", "encoding", "delimiter", "missing_ok", "add_source", absent=False)
def test_every_file_fetch_setting(automator_runner: WorkflowRunner) -> None:
    automator_runner.write("data/export.txt", json.dumps({"result": {"rows": [{"n": 1}, {"n": 2}]}}))
    automator_runner.write("data/latin.csv", "n;city\n1;Köln\n".encode("latin-1"))

    rows = fetch(automator_runner, "{path: 'data/export.txt', format: json, items: result.rows, add_source: true}")
    latin = fetch(automator_runner, "{path: data/latin.csv, encoding: latin-1, delimiter: ';'}")
    missing = fetch(automator_runner, "{path: 'nothing/*.json', missing_ok: true}")
    templated = automator_runner.run(
        """
        params: {name: latin}
        steps:
          - {id: src, uses: file.fetch, with: {path: "data/{{ params.name }}.csv", format: csv, delimiter: ";", encoding: latin-1}}
          - {id: out, uses: test.deliver}
        """
    )

    assert rows.delivered["out"] == [
        {"n": 1, "_source": "export.txt", "_line": 1},
        {"n": 2, "_source": "export.txt", "_line": 2},
    ]
    assert latin.delivered["out"] == [{"n": "1", "city": "Köln"}]
    assert (missing.status, missing.outcomes["delivered"]) == ("succeeded", 0)
    assert templated.delivered["out"] == [{"n": "1", "city": "Köln"}]


@covers(FETCH, "add_source", absent=False)
def test_add_source_gives_csv_and_jsonl_line_numbers(automator_runner: WorkflowRunner) -> None:
    automator_runner.write("d/a.csv", "n\n1\n2\n")
    automator_runner.write("d/b.jsonl", '{"n": 3}\n\n{"n": 4}\n')

    result = fetch(automator_runner, "{path: 'd/*', add_source: true}")

    assert [(i["_source"], i["_line"]) for i in result.delivered["out"]] == [
        ("a.csv", 2),
        ("a.csv", 3),
        ("b.jsonl", 1),
        ("b.jsonl", 3),
    ]


# --- file.deliver -----------------------------------------------------------------------------


def deliver(runner: WorkflowRunner, items: list[Any], settings: str) -> Any:
    return runner.run(
        f"""
        steps:
          - id: src
            uses: test.fetch
            with: {{items: {json.dumps(items)}}}
          - id: save
            uses: file.deliver
            with: {settings}
        """
    )


ITEMS = [{"id": 1, "tags": ["a"]}, {"id": 2, "extra": "x"}]


@covers(DELIVER, "path", "format", "mode", "fields", absent=True)
def test_with_only_a_path_it_writes_by_extension_and_replaces_the_file(automator_runner: WorkflowRunner) -> None:
    out = automator_runner.directory / "out"
    for name in ("items.jsonl", "items.json", "items.csv"):
        automator_runner.write(f"out/{name}", "old content\n")
        result = deliver(automator_runner, ITEMS, f"{{path: out/{name}}}")
        assert result.status == "succeeded", result.error

    assert (out / "items.jsonl").read_text() == '{"id": 1, "tags": ["a"]}\n{"id": 2, "extra": "x"}\n'
    assert json.loads((out / "items.json").read_text()) == ITEMS
    # every key seen, in order of first appearance; lists as JSON text
    assert (out / "items.csv").read_text() == 'id,tags,extra\n1,"[""a""]",\n2,,x\n'


@covers(DELIVER, "path", "format", "mode", "fields", absent=False)
def test_every_file_deliver_setting(automator_runner: WorkflowRunner) -> None:
    out = automator_runner.directory / "out"

    forced = deliver(automator_runner, ITEMS, "{path: out/items.txt, format: jsonl}")
    first = deliver(automator_runner, ITEMS[:1], "{path: out/log.csv, mode: append, fields: [extra, id]}")
    second = deliver(automator_runner, ITEMS[1:], "{path: out/log.csv, mode: append, fields: [extra, id]}")
    listed = deliver(automator_runner, ITEMS[:1], "{path: out/list.json, mode: append}")
    listed_again = deliver(automator_runner, ITEMS[1:], "{path: out/list.json, mode: append}")
    per_run = deliver(automator_runner, ITEMS, "{path: 'out/run-{{ run.id }}.jsonl'}")

    assert all(r.status == "succeeded" for r in (forced, first, second, listed, listed_again, per_run))
    assert (out / "items.txt").read_text().count("\n") == 2
    assert (out / "log.csv").read_text() == "extra,id\n,1\nx,2\n"  # one header; only the fields, in order
    assert json.loads((out / "list.json").read_text()) == ITEMS
    assert (out / f"run-{per_run.run.id}.jsonl").exists()


def test_a_new_output_file_gets_the_umasks_mode(automator_runner: WorkflowRunner) -> None:
    old = os.umask(0o022)
    try:
        deliver(automator_runner, ITEMS, "{path: out/shared.jsonl}")
    finally:
        os.umask(old)

    assert stat.S_IMODE((automator_runner.directory / "out" / "shared.jsonl").stat().st_mode) == 0o644
