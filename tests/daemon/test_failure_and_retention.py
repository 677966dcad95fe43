"""on_failure steps notify with the run's error; retention prunes old history but keeps delivered keys."""

from __future__ import annotations

import asyncio
import textwrap
from datetime import timedelta
from pathlib import Path

from sqlalchemy import update

from automator.daemon.retention import Retention
from automator.engine.runner import run_workflow
from automator.history.daemon_store import DaemonStore
from automator.history.models import Run
from automator.history.store import History, ItemRow, OutcomeRow, now
from automator.plugins.manager import Plugins
from automator.spec.loader import load_workflow
from tests.daemon.conftest import Receiver


def test_on_failure_steps_get_the_run_and_its_error(
    tmp_path: Path, history: History, plugins: Plugins, http_server
) -> None:
    receiver = Receiver(http_server)
    path = tmp_path / "fragile.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            name: fragile
            steps:
              - id: read
                uses: file.fetch
                with: {{path: missing.jsonl}}
            on_failure:
              - id: tell
                uses: webhook.deliver
                with:
                  url: "{receiver.url}"
                  body: {{text: "{{{{ run.workflow }}}} run {{{{ run.id }}}} {{{{ run.status }}}}: {{{{ run.error }}}}"}}
            """
        )
    )
    result = asyncio.run(run_workflow(load_workflow(path, plugins), history, plugins, trigger="schedule"))
    assert result.status == "failed"
    assert len(receiver.requests) == 1
    text = receiver.requests[0][1]["text"]
    assert text.startswith(f"fragile run {result.run_id} failed: step read (file.fetch) failed")
    assert "no file matches" in text
    tell = [s for s in history.get_run(result.run_id).steps if s.step_id == "tell"]
    assert [s.status for s in tell] == ["succeeded"]


def test_on_failure_does_not_fire_for_a_good_run(
    tmp_path: Path, history: History, plugins: Plugins, http_server
) -> None:
    receiver = Receiver(http_server)
    (tmp_path / "items.jsonl").write_text('{"id": 1}\n')
    path = tmp_path / "fine.yaml"
    path.write_text(
        "name: fine\nsteps:\n  - {id: read, uses: file.fetch, with: {path: items.jsonl}}\n"
        f"on_failure:\n  - {{id: tell, uses: webhook.deliver, with: {{url: '{receiver.url}'}}}}\n"
    )
    result = asyncio.run(run_workflow(load_workflow(path, plugins), history, plugins))
    assert result.succeeded
    assert receiver.requests == []


def _old_run(history: History, keys: list[str | None], outcome: str, days_ago: int) -> int:
    run = history.start_run(workflow="feed", version="v1", path=None, trigger="schedule")
    history.add_items(run.id, "feed", [ItemRow(i, key, "read", {"body": "x" * 50}) for i, key in enumerate(keys)])
    history.set_outcomes(run.id, [OutcomeRow(i, outcome, "post", None, {"sent": True}) for i in range(len(keys))])
    history.finish_run(run.id, status="succeeded", error=None, error_step=None, counts={"fetched": len(keys)})
    with history.engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run.id).values(finished_at=now() - timedelta(days=days_ago)))
    return run.id


def test_retention_prunes_old_runs_but_remembers_delivered_keys(history: History) -> None:
    delivered = _old_run(history, ["a", "b"], "delivered", days_ago=40)
    skipped = _old_run(history, ["c"], "skipped", days_ago=40)
    unkeyed = _old_run(history, [None], "delivered", days_ago=40)
    recent = _old_run(history, ["d"], "delivered", days_ago=2)

    removed = Retention(DaemonStore(history), timedelta(days=30), batch=2, pause=0).prune()
    assert removed == 2
    assert history.get_run(skipped) is None
    assert history.get_run(unkeyed) is None
    # what an old run delivered is still known, so a feed repeating it does not post it again
    assert history.delivered_keys("feed", ["a", "b", "c", "d"]) == {"a": delivered, "b": delivered, "d": recent}
    kept = history.items(delivered)
    assert [(i.key, i.data, i.result) for i in kept] == [("a", {}, None), ("b", {}, None)]
    assert history.get_run(delivered).steps == []
    assert history.items(recent)[0].data == {"body": "x" * 50}
    # a second pass has nothing more to do
    assert Retention(DaemonStore(history), timedelta(days=30), pause=0).prune() == 0
