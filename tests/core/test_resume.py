"""A run whose process is killed mid-way is resumed from its ledger: nothing is delivered twice."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from werkzeug import Request, Response

from automator import History
from tests.conftest import resume_crashed, run_until_killed

CRASHER = """
import os, signal
from pathlib import Path
from automator import TransformStep, StepConfig, hookimpl

class CrashConfig(StepConfig):
    marker: str
    at_seq: int

class Crash(TransformStep[CrashConfig]):
    name = "test.crash_once"

    def transform(self, item):
        marker = Path(self.config.marker)
        if item.seq == self.config.at_seq and not marker.exists():
            marker.write_text("crashed")
            os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no finally: a real crash
        return item.data

@hookimpl
def register_step_types(register):
    register(Crash)
"""


def test_kill_9_then_resume_delivers_each_item_once(tmp_path: Path, history_url: str, httpserver) -> None:
    received: list[str] = []

    def hook(request: Request) -> Response:
        received.append(request.get_json()["id"])
        return Response("ok")

    httpserver.expect_request("/hook", method="POST").respond_with_handler(hook)
    project = tmp_path / "project"
    (project / "workflows").mkdir(parents=True)
    (project / "plugins").mkdir()
    (project / "plugins" / "crasher.py").write_text(textwrap.dedent(CRASHER))
    (project / "workflows" / "items.jsonl").write_text("".join(json.dumps({"id": f"t{i}"}) + "\n" for i in range(30)))
    marker = tmp_path / "crashed-once"
    flow = project / "workflows" / "notify.yaml"
    flow.write_text(
        textwrap.dedent(
            f"""
            name: notify
            steps:
              - id: read
                uses: file.fetch
                with: {{path: items.jsonl}}
                key: "{{{{ item.id }}}}"
              - id: post
                uses: webhook.deliver
                concurrency: 1
                with: {{url: "{httpserver.url_for("/hook")}"}}
              - id: after
                uses: test.crash_once
                with: {{marker: "{marker}", at_seq: 7}}
              - id: archive
                uses: file.deliver
                with: {{path: archive.jsonl}}
            """
        )
    )
    run_until_killed(flow, history_url)
    # items stream through post → after one by one: the crash at item 7 came after some posts
    before = list(received)
    assert before and len(before) == len(set(before))

    history = History(history_url)
    crashed_id = history.list_runs()[0].id
    assert {row.outcome for row in history.items(crashed_id)} == {"pending"}
    # every post that was answered was written down before the item moved on
    assert {row.key for row in history.items(crashed_id) if row.delivered_by == ["post"]} == set(before)

    run_id, result = resume_crashed(flow, project / "plugins", history)
    assert result.status == "succeeded"
    assert result.run_id == run_id == crashed_id
    assert result.counts == {"fetched": 30, "delivered": 30, "skipped": 0, "quarantined": 0, "failed": 0}
    assert len(received) == 30  # the webhook got nothing twice
    assert len((project / "workflows" / "archive.jsonl").read_text().splitlines()) == 30
    history.close()
