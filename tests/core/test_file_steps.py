"""file.fetch and file.deliver: formats, globs, appends, and writes that are all or nothing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest


def test_globs_over_csv_jsonl_and_json_files(cli, write_workflow, workflow_dir: Path) -> None:
    inbox = workflow_dir / "inbox"
    inbox.mkdir()
    (inbox / "a.csv").write_text("id,name\n1,ann\n2,bob\n")
    (inbox / "b.jsonl").write_text('{"id": 3, "name": "cid"}\n\n{"id": 4, "name": "dee"}\n')
    (inbox / "c.json").write_text('{"people": [{"id": 5, "name": "eve"}]}')
    path = write_workflow(
        """
        steps:
          - id: csv
            uses: file.fetch
            with: {path: "inbox/*.csv", add_source: true}
          - id: jsonl
            uses: file.fetch
            with: {path: "inbox/*.jsonl"}
          - id: json
            uses: file.fetch
            with: {path: inbox/c.json, items: people}
          - id: write
            uses: file.deliver
            with: {path: out/all.json}
        """
    )
    run = cli("run", path, "--json").json()
    assert run["status"] == "succeeded", run
    rows = json.loads((workflow_dir / "out" / "all.json").read_text())
    assert [r["name"] for r in rows] == ["ann", "bob", "cid", "dee", "eve"]
    assert rows[0]["_source"] == "a.csv" and rows[0]["_line"] == 2
    assert rows[0]["id"] == "1"  # CSV cells stay text


def test_bad_json_lines_name_the_file_and_line(cli, write_workflow, workflow_dir: Path) -> None:
    (workflow_dir / "bad.jsonl").write_text('{"id": 1}\n{"id": 2,,}\n')
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: bad.jsonl}
        """
    )
    run = cli("run", path, "--json").json()
    assert run["status"] == "failed"
    assert f"{workflow_dir / 'bad.jsonl'}:2:10: not valid JSON" in run["error"]


def test_csv_delivery_with_chosen_columns_and_append(cli, write_workflow, workflow_dir: Path) -> None:
    (workflow_dir / "in.jsonl").write_text('{"id": 1, "tags": ["a", "b"], "x": 0}\n{"id": 2, "tags": []}\n')
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: in.jsonl}
          - id: write
            uses: file.deliver
            with: {path: out.csv, fields: [id, tags], mode: append}
        """
    )
    cli("run", path)
    cli("run", path)
    lines = (workflow_dir / "out.csv").read_text().splitlines()
    assert lines == ["id,tags", '1,"[""a"", ""b""]"', "2,[]", '1,"[""a"", ""b""]"', "2,[]"]


def test_a_failed_write_leaves_the_old_file_and_fails_every_item(cli, write_workflow, workflow_dir: Path) -> None:
    (workflow_dir / "in.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    (workflow_dir / "blocker").write_text("a file where a folder should be")
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: in.jsonl}
          - id: write
            uses: file.deliver
            with: {path: blocker/out.jsonl}
        """
    )
    run = cli("run", path, "--json").json()
    assert run["items"] == {"fetched": 2, "delivered": 0, "skipped": 0, "quarantined": 0, "failed": 2}
    assert "cannot write" in run["error"]
    assert (workflow_dir / "blocker").read_text() == "a file where a folder should be"
    assert not list(workflow_dir.glob(".out.jsonl*"))


def test_a_template_transform_with_one_template_and_into(cli, write_workflow, workflow_dir: Path) -> None:
    (workflow_dir / "in.jsonl").write_text('{"id": 1, "title": "disk full"}\n')
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: in.jsonl}
          - id: line
            uses: template.transform
            with:
              template: "#{{ item.id }}: {{ item.title | upper }}"
              into: text
          - id: origin
            uses: template.transform
            with: {mapping: {text: "{{ item.text }}", raw_title: "{{ steps.read.title }}"}}
          - id: write
            uses: file.deliver
            with: {path: out.jsonl}
        """
    )
    cli("run", path)
    assert json.loads((workflow_dir / "out.jsonl").read_text()) == {"text": "#1: DISK FULL", "raw_title": "disk full"}


@pytest.fixture
def umask():
    """Set the process umask for one test (as a shell's `umask 022` would)."""
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_an_output_file_gets_the_mode_the_umask_gives(
    cli, write_workflow, workflow_dir: Path, umask, mask, expected
) -> None:
    (workflow_dir / "items.jsonl").write_text('{"id": 1}\n')
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: items.jsonl}
          - id: write
            uses: file.deliver
            with: {path: out/items.jsonl}
        """
    )
    umask(mask)
    run = cli("run", path, "--json").json()
    assert run["status"] == "succeeded", run
    assert stat.S_IMODE((workflow_dir / "out" / "items.jsonl").stat().st_mode) == expected


def test_an_existing_output_file_keeps_its_mode(cli, write_workflow, workflow_dir: Path, umask) -> None:
    (workflow_dir / "items.jsonl").write_text('{"id": 1}\n')
    out = workflow_dir / "out.jsonl"
    out.write_text("")
    out.chmod(0o640)  # the operator chose who reads the output
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: items.jsonl}
          - id: write
            uses: file.deliver
            with: {path: out.jsonl, mode: append}
        """
    )
    run = cli("run", path, "--json").json()
    assert run["status"] == "succeeded", run
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert out.read_text() == '{"id": 1}\n'
