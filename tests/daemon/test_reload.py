"""Hot reload: a changed file takes effect, a broken one keeps its last good version, a removed one stops."""

from __future__ import annotations

from pathlib import Path

from automator.history.store import History
from tests.daemon.conftest import wait_for

FLOW = """
name: flow
schedule: {{every: 1s}}
steps:
  - id: read
    uses: file.fetch
    with: {{path: items.jsonl}}
  - id: shape
    uses: template.transform
    with: {{mapping: {{label: "{label}"}}}}
"""


def test_changed_broken_and_removed_files(workflows: Path, write, start_daemon, read_history: History) -> None:
    (workflows / "items.jsonl").write_text('{"id": 1}\n')
    path = write("flow.yaml", FLOW.format(label="one"))
    daemon = start_daemon()
    first = wait_for(lambda: read_history.list_runs(workflow="flow"), 10, "a first run")[0]

    write("flow.yaml", FLOW.format(label="two"))
    second = wait_for(
        lambda: [
            r
            for r in read_history.list_runs(workflow="flow")
            if r.workflow_version != first.workflow_version and r.status != "running"
        ],
        5,
        "a run of the changed version",
    )[0]
    assert read_history.items(second.id)[0].result == {"label": "two"}

    # an edit that breaks the file: logged with FILE:LINE:COL, the last good version keeps running
    write("flow.yaml", FLOW.format(label="three").replace("every: 1s", "every: soon"))
    wait_for(lambda: any(line.get("level") == "error" for line in daemon.logs()), 5, "the error in the log")
    error = next(line for line in daemon.logs() if line.get("level") == "error")
    assert any(p.startswith(f"{path}:2:") and "invalid duration" in p for p in error["problems"]), error
    seen = len(read_history.list_runs(workflow="flow", limit=1000))
    wait_for(lambda: len(read_history.list_runs(workflow="flow", limit=1000)) >= seen + 2, 5, "runs to go on")
    # the newest finished run (a newer one may be under way: runs fire every second)
    latest = next(r for r in read_history.list_runs(workflow="flow") if r.status != "running")
    assert latest.workflow_version == second.workflow_version
    assert latest.status == "succeeded"

    path.unlink()
    wait_for(lambda: any("removed" in line["message"] for line in daemon.logs()), 5, "the removal")
    # a fire already under way may still finish; after that, no new run in three seconds' worth of rounds
    wait_for(lambda: all(r.status != "running" for r in read_history.list_runs(workflow="flow")), 5, "runs to end")
    count = len(read_history.list_runs(workflow="flow", limit=1000))
    daemon.wait_rounds(3, "three housekeeping rounds (the schedule fired every second)")
    assert len(read_history.list_runs(workflow="flow", limit=1000)) == count

    # and a new file is picked up without a restart
    write("later.yaml", FLOW.format(label="new").replace("name: flow", "name: later"))
    wait_for(lambda: read_history.list_runs(workflow="later"), 5, "the new workflow's first run")
    assert daemon.stop() == 0
