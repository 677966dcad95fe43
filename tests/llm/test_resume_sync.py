"""A model run killed after its answers were recorded is resumed without paying for them again."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from automator import History
from tests.conftest import resume_crashed, run_until_killed
from tests.llm.fake_openai import FakeOpenAI

CRASH_AFTER_MODEL = """
import asyncio, os, signal, time
from pathlib import Path
from sqlalchemy import create_engine, text
from automator import TransformStep, StepConfig, hookimpl

class CrashConfig(StepConfig):
    marker: str
    database: str
    calls: int

class Crash(TransformStep[CrashConfig]):
    name = "test.crash_after_model"

    async def transform(self, item):
        marker = Path(self.config.marker)
        if not marker.exists():
            marker.write_text("crashed")
            # items stream through the steps: wait (a condition, polled) for every answer to be recorded
            engine = create_engine(self.config.database)  # the history's URL, SQLite or PostgreSQL
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with engine.connect() as db:
                    answered = text("select count(*) from model_calls where status = 'ok'")
                    if db.execute(answered).scalar() >= self.config.calls:
                        break
                await asyncio.sleep(0.02)  # the model step goes on meanwhile
            os.kill(os.getpid(), signal.SIGKILL)
        return item.data

@hookimpl
def register_step_types(register):
    register(Crash)
"""


def test_a_killed_model_run_resumes_without_a_second_call(
    tmp_path: Path, history_url: str, fake_openai: FakeOpenAI
) -> None:
    project = tmp_path / "project"
    (project / "workflows").mkdir(parents=True)
    (project / "plugins").mkdir()
    (project / "plugins" / "crash.py").write_text(textwrap.dedent(CRASH_AFTER_MODEL))
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
                concurrency: 3
                with:
                  instructions: Classify the ticket.
                  input: "{{{{ item.subject }}}}: {{{{ item.body }}}}"
                  output:
                    schema: {{category: {{enum: [billing, bug, other]}}}}
                    into: triage
                  temperature: 0.7          # no cache by default: only a resume may read it
                  max_output_tokens: 50
              - id: crash
                uses: test.crash_after_model
                with: {{marker: "{tmp_path / "crashed"}", database: "{history_url}", calls: 6}}
              - id: save
                uses: file.deliver
                with: {{path: out.jsonl}}
            """
        )
    )
    run_until_killed(flow, history_url)
    paid_before = len(fake_openai.completions)
    assert paid_before == 6

    history = History(history_url)
    run_id, result = resume_crashed(flow, project / "plugins", history)
    assert result.status == "succeeded", result.error
    assert result.counts["delivered"] == 6
    assert len(fake_openai.completions) == paid_before  # every answer came from the record
    saved = [json.loads(line) for line in (project / "workflows" / "out.jsonl").read_text().splitlines()]
    assert all(row["triage"]["category"] in ("billing", "bug", "other") for row in saved)
    usage = history.model_usage(run_id)
    assert usage["classify"]["calls"] == 6  # the bill shows the six calls once
    history.close()
