"""Plugin files are loaded at start: a change while the daemon runs is reported, a restart applies it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import httpx

from automator.history.store import History
from tests.daemon.conftest import DaemonProcess, wait_for

PLUGIN = """
from automator import StepConfig, TransformStep, hookimpl


class Shout(TransformStep[StepConfig]):
    name = "shout.upper"

    def transform(self, item):
        return {{"text": item.data["text"]{how}}}


@hookimpl
def register_step_types(register):
    register(Shout)
"""

SHOUTING = """
name: shouting
schedule: {every: 1s}
steps:
  - id: read
    uses: file.fetch
    with: {path: items.jsonl}
  - id: shout
    uses: shout.upper
"""


def warnings_about(daemon: DaemonProcess, path: Path, change: str) -> list[dict]:
    return [
        line
        for line in daemon.logs()
        if line.get("level") == "warning" and line.get("file") == str(path) and line.get("change") == change
    ]


def health(daemon: DaemonProcess) -> dict:
    return httpx.get(f"{daemon.base}/healthz", timeout=5).json()


def test_a_plugin_added_or_changed_while_running_is_reported_and_needs_a_restart(
    workflows: Path, write, start_daemon, read_history: History
) -> None:
    plugins_dir = workflows.parent / "plugins"  # beside the workflows folder
    plugins_dir.mkdir()
    (workflows / "items.jsonl").write_text('{"text": "hello"}\n')
    write("shouting.yaml", SHOUTING)
    daemon = start_daemon()
    assert health(daemon)["invalid_files"] == 1  # its step type does not exist yet

    plugin = plugins_dir / "shout.py"
    plugin.write_text(textwrap.dedent(PLUGIN.format(how=".upper()")))
    warning = wait_for(lambda: warnings_about(daemon, plugin, "added"), 10, "the warning about the new plugin")
    assert "restart the daemon" in warning[0]["message"]
    assert len(warnings_about(daemon, plugin, "added")) == 1  # said once, not at every poll
    assert health(daemon)["invalid_files"] == 1
    assert read_history.list_runs(workflow="shouting") == []
    assert daemon.stop() == 0

    # after a restart the plugin is loaded and the workflow runs
    seen = len(daemon.logs())
    daemon = start_daemon()
    run = wait_for(lambda: read_history.list_runs(workflow="shouting", status="succeeded"), 10, "a run")[0]
    assert read_history.items(run.id)[0].result == {"text": "HELLO"}
    assert not [line for line in daemon.logs()[seen:] if line.get("change")]  # nothing new to report

    # a change is reported too; the runs go on with what was loaded at start
    plugin.write_text(textwrap.dedent(PLUGIN.format(how=".lower() + '!'")))
    wait_for(lambda: warnings_about(daemon, plugin, "changed"), 10, "the warning about the changed plugin")
    after = len(read_history.list_runs(workflow="shouting", limit=1000))
    wait_for(lambda: len(read_history.list_runs(workflow="shouting", limit=1000)) >= after + 2, 10, "more runs")
    latest = read_history.list_runs(workflow="shouting", status="succeeded")[0]
    assert read_history.items(latest.id)[0].result == {"text": "HELLO"}
    assert daemon.stop() == 0
