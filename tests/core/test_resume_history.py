"""A resumed run's history reads like a finished run: no step left running, each model call counted once."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from automator import History
from tests.conftest import resume_crashed, run_until_killed
from tests.llm.fake_openai import FakeOpenAI

# dies (SIGKILL, no cleanup) once the model step's calls are written down: a real crash
CRASH_AFTER_RECORDED_CALLS = """
import os, signal, time
from pathlib import Path
from sqlalchemy import create_engine, text
from automator import TransformStep, StepConfig, hookimpl

class CrashConfig(StepConfig):
    marker: str
    database: str
    calls: int

class Crash(TransformStep[CrashConfig]):
    name = "test.crash_when_recorded"
    blocking = True   # waits in a thread: the event loop goes on recording the other answers

    def transform(self, item):
        marker = Path(self.config.marker)
        if not marker.exists():
            marker.write_text("crashed")
            engine = create_engine(self.config.database)  # the history's URL, SQLite or PostgreSQL
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:   # a condition, polled: the recorder writes in the background
                with engine.connect() as db:
                    # answered calls: a call's row is written (`sent`) before its request leaves
                    answered = text("select count(*) from model_calls where status = 'ok'")
                    if db.execute(answered).scalar() >= self.config.calls:
                        break
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGKILL)
        return item.data

@hookimpl
def register_step_types(register):
    register(Crash)
"""


@pytest.fixture
def fake_openai(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-resume-history")
        yield server


def test_after_a_resume_no_step_is_running_and_step_costs_add_up_to_costs(
    tmp_path: Path, history_url: str, fake_openai: FakeOpenAI, cli
) -> None:
    project = tmp_path / "project"
    (project / "workflows").mkdir(parents=True)
    (project / "plugins").mkdir()
    (project / "plugins" / "crash.py").write_text(textwrap.dedent(CRASH_AFTER_RECORDED_CALLS))
    tickets = [{"id": i, "subject": f"ticket {i}", "body": "please help"} for i in range(6)]
    (project / "workflows" / "items.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tickets))
    flow = project / "workflows" / "classify.yaml"
    flow.write_text(
        textwrap.dedent(
            f"""
            name: classify
            steps:
              - id: read
                uses: file.fetch
                with: {{path: items.jsonl}}
                key: "{{{{ item.id }}}}"
              - id: classify
                uses: openai.transform
                with:
                  instructions: Classify the ticket.
                  input: "{{{{ item.subject }}}}: {{{{ item.body }}}}"
                  output:
                    schema: {{category: {{enum: [billing, bug, other]}}}}
                  max_output_tokens: 50
              - id: crash
                uses: test.crash_when_recorded
                with: {{marker: "{tmp_path / "crashed"}", database: "{history_url}", calls: 6}}
              - id: save
                uses: file.deliver
                with: {{path: out.jsonl}}
            """
        )
    )
    run_until_killed(flow, history_url)
    history = History(history_url)
    run_id, result = resume_crashed(flow, project / "plugins", history)
    history.close()
    assert result.status == "succeeded", result.error

    shown = cli("runs", "show", str(run_id), "--json").json()
    assert shown["status"] == "succeeded"
    statuses = [(s["step_id"], s["status"]) for s in shown["steps"]]
    assert "running" not in {status for _step, status in statuses}, statuses
    crashed = [s for s in shown["steps"] if s["status"] == "crashed"]
    # the attempts the process died in: the crash step, and the model step items streamed from
    assert "crash" in [s["step_id"] for s in crashed]
    assert {s["step_id"] for s in crashed} <= {"classify", "crash"}
    assert all(s["finished_at"] is not None for s in shown["steps"])

    step_cost = sum(Decimal(str(s["llm"]["cost_usd"])) for s in shown["steps"] if s["llm"])
    step_calls = sum(s["llm"]["calls"] for s in shown["steps"] if s["llm"])
    (billed,) = cli("costs", "--json").json()
    assert step_calls == billed["calls"] == 6
    assert step_cost == Decimal(billed["cost_usd"]) > 0
