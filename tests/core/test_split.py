"""A transform that returns a list splits its item: each element a new item, keyed from the parent."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from automator import History
from tests.conftest import resume_crashed, run_until_killed

PLUGIN = """
import os, signal
from pathlib import Path
from automator import DeliverStep, StepConfig, TransformStep, hookimpl

class Attachments(TransformStep[StepConfig]):
    name = "test.attachments"

    def transform(self, item):
        return [{"mail": item.data["id"], "file": name} for name in item.data["files"]]

class CrashConfig(StepConfig):
    marker: str
    at_key: str

class Crash(TransformStep[CrashConfig]):
    name = "test.crash_once"

    def transform(self, item):
        marker = Path(self.config.marker)
        if item.key == self.config.at_key and not marker.exists():
            marker.write_text("crashed")
            os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no finally: a real crash
        return item.data

class AppendConfig(StepConfig):
    path: str

class Append(DeliverStep[AppendConfig]):
    name = "test.append"

    def deliver(self, item):
        with open(self.config.path, "a") as out:
            out.write(item.key + "\\n")

@hookimpl
def register_step_types(register):
    register(Attachments)
    register(Crash)
    register(Append)
"""


def _project(tmp_path: Path, mails: list[dict[str, object]], steps: str) -> Path:
    project = tmp_path / "project"
    (project / "plugins").mkdir(parents=True)
    (project / "workflows").mkdir()
    (project / "plugins" / "split.py").write_text(textwrap.dedent(PLUGIN))
    (project / "workflows" / "mails.jsonl").write_text("".join(json.dumps(m) + "\n" for m in mails))
    flow = project / "workflows" / "attachments.yaml"
    flow.write_text(
        textwrap.dedent(
            """
            name: attachments
            chunk_size: 5
            steps:
              - id: mails
                uses: file.fetch
                with: {path: mails.jsonl}
                key: "{{ item.id }}"
            """
        )
        + textwrap.indent(textwrap.dedent(steps), "  ")
    )
    return flow


MAILS = [{"id": f"m{i}", "files": [f"f{j}.pdf" for j in range(i % 4)]} for i in range(20)]
EXPECTED = sorted(f"m{i}/{j + 1}" for i in range(20) for j in range(i % 4))


def test_each_element_becomes_an_item_keyed_by_parent_and_position(
    tmp_path: Path, cli, history: History, history_url: str
) -> None:
    out = tmp_path / "out.txt"
    flow = _project(
        tmp_path,
        MAILS,
        f"""
        - id: split
          uses: test.attachments
        - id: out
          uses: test.append
          with: {{path: "{out}"}}
        """,
    )
    result = cli("run", flow)
    assert result.exit_code == 0, result.output
    assert sorted(out.read_text().split()) == EXPECTED
    run = history.list_runs()[0]
    items = history.items(run.id)
    parents = [i for i in items if i.key and "/" not in i.key]
    assert len(parents) == 20 and {p.outcome for p in parents} == {"skipped"}
    assert next(p.reason for p in parents if p.key == "m0") == "split into no items by split"
    assert next(p.reason for p in parents if p.key == "m3").startswith("split into 3 items (")
    children = [i for i in items if i.key and "/" in i.key]
    assert sorted(c.key for c in children) == EXPECTED
    assert {c.outcome for c in children} == {"delivered"}
    assert {c.data["mail"] for c in children if c.key.startswith("m7/")} == {"m7"}


def test_key_template_on_the_splitting_step(tmp_path: Path, cli, history: History) -> None:
    out = tmp_path / "out.txt"
    flow = _project(
        tmp_path,
        MAILS[:6],
        f"""
        - id: split
          uses: test.attachments
          key: "{{{{ item.mail }}}}:{{{{ item.file }}}}"
        - id: out
          uses: test.append
          with: {{path: "{out}"}}
        """,
    )
    assert cli("run", flow).exit_code == 0
    assert sorted(out.read_text().split()) == sorted(f"m{i}:f{j}.pdf" for i in range(6) for j in range(i % 4))
    # a second run: the children's keys were delivered, so they are skipped (only_new, as fetched items)
    assert cli("run", flow).exit_code == 0
    run = history.list_runs()[0]
    counts = {i.key: i.outcome for i in history.items(run.id) if ":" in (i.key or "")}
    assert counts and set(counts.values()) == {"skipped"}
    assert len(out.read_text().split()) == len(counts)


def test_a_run_killed_after_a_split_resumes_with_the_same_keys(tmp_path: Path, history_url: str) -> None:
    out = tmp_path / "out.txt"
    flow = _project(
        tmp_path,
        MAILS,
        f"""
        - id: split
          uses: test.attachments
        - id: after
          uses: test.crash_once
          with: {{marker: "{tmp_path / "crashed"}", at_key: "m9/1"}}
        - id: out
          uses: test.append
          with: {{path: "{out}"}}
        """,
    )
    run_until_killed(flow, history_url)
    history = History(history_url)
    run_id, result = resume_crashed(flow, flow.parent.parent / "plugins", history)
    assert result.status == "succeeded", result.error
    items = history.items(run_id)
    assert sorted(i.key for i in items if "/" in (i.key or "")) == EXPECTED  # no child made twice
    assert all(i.outcome != "pending" for i in items)
    delivered = out.read_text().split()
    assert sorted(set(delivered)) == EXPECTED and len(delivered) == len(EXPECTED)
    history.close()
