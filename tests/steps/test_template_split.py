"""template.transform each: one item per element of a list, keyed from the parent, delivered once."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from automator import History
from tests.steps.coverage import covers

MAILS = [
    {"id": "m1", "attachments": [{"name": "a.png", "type": "image/png"}, {"name": "b.pdf", "type": "application/pdf"}]},
    {"id": "m2", "attachments": []},
    {"id": "m3", "attachments": [{"name": "c.jpg", "type": "image/jpeg"}]},
    {"id": "m4", "attachments": "not a list"},
]


def _flow(tmp_path: Path, split: str) -> Path:
    (tmp_path / "mails.jsonl").write_text("".join(json.dumps(m) + "\n" for m in MAILS))
    flow = tmp_path / "attachments.yaml"
    flow.write_text(
        textwrap.dedent(
            """
            name: attachments
            steps:
              - id: mails
                uses: file.fetch
                with: {path: mails.jsonl}
                key: "{{ item.id }}"
            """
        )
        + textwrap.indent(textwrap.dedent(split), "  ")
        + textwrap.indent(
            textwrap.dedent(
                """
                - id: images
                  uses: file.deliver
                  when: "{{ item.type.startswith('image/') }}"
                  with: {path: images.jsonl}
                """
            ),
            "  ",
        )
    )
    return flow


@covers("template.transform", "each", absent=False)
def test_each_splits_a_mail_into_its_attachments(tmp_path: Path, cli, history: History) -> None:
    flow = _flow(
        tmp_path,
        """
        - id: split
          uses: template.transform
          with:
            each: "{{ item.attachments }}"
            mapping: {mail: "{{ steps.mails.id }}", file: "{{ item.name }}", type: "{{ item.type }}"}
        """,
    )
    result = cli("run", flow)
    assert result.exit_code == 1  # m4's attachments are not a list: that item fails, the others go on
    images = [json.loads(line) for line in (tmp_path / "images.jsonl").read_text().splitlines()]
    assert sorted((i["mail"], i["file"]) for i in images) == [("m1", "a.png"), ("m3", "c.jpg")]
    run = history.list_runs()[0]
    items = {i.key: i for i in history.items(run.id)}
    assert items["m1"].outcome == "skipped" and items["m1"].reason.startswith("split into 2 items")
    assert items["m2"].reason == "split into no items by split"
    assert items["m4"].outcome == "failed" and "each: gave str, not a list" in items["m4"].reason
    assert items["m1/1"].outcome == "delivered" and items["m3/1"].outcome == "delivered"
    assert items["m1/2"].outcome == "skipped"  # a pdf: the image step's when: is false, no deliver step took it


def test_each_without_mapping_keeps_the_elements_and_takes_the_steps_key(tmp_path: Path, cli, history: History) -> None:
    flow = _flow(
        tmp_path,
        """
        - id: split
          uses: template.transform
          key: "{{ steps.mails.id }}:{{ item.name }}"
          with:
            each: "{{ item.attachments }}"
        """,
    )
    cli("run", flow)
    images = [json.loads(line) for line in (tmp_path / "images.jsonl").read_text().splitlines()]
    assert sorted(i["name"] for i in images) == ["a.png", "c.jpg"]
    run = history.list_runs()[0]
    keys = {i.key for i in history.items(run.id)}
    assert {"m1:a.png", "m1:b.pdf", "m3:c.jpg"} <= keys


def test_each_must_be_a_template(tmp_path: Path, cli) -> None:
    flow = _flow(
        tmp_path,
        """
        - id: split
          uses: template.transform
          with:
            each: item.attachments
        """,
    )
    result = cli("validate", flow)
    assert result.exit_code != 0
    assert "each: must be a template giving a list" in result.stdout + result.stderr


@covers("template.transform", "each", absent=True)
def test_without_each_a_list_stays_inside_one_item(tmp_path: Path, cli, history: History) -> None:
    flow = _flow(
        tmp_path,
        """
        - id: split
          uses: template.transform
          with:
            mapping: {type: "image/none", files: "{{ item.attachments }}"}
        """,
    )
    assert cli("run", flow).exit_code == 0
    images = [json.loads(line) for line in (tmp_path / "images.jsonl").read_text().splitlines()]
    assert [i["files"] for i in images] == [m["attachments"] for m in MAILS]  # one item per mail, list kept
    run = history.list_runs()[0]
    assert sorted(i.key for i in history.items(run.id)) == ["m1", "m2", "m3", "m4"]
