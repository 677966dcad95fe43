"""A run killed while its fetch still pages goes on fetching where it was, taking no page twice."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from automator import History
from tests.conftest import resume_crashed, run_until_killed

PLUGIN = """
import os, signal
from pathlib import Path
from automator import Checkpoint, DeliverStep, FetchStep, StepConfig, TransformStep, hookimpl

class PagesConfig(StepConfig):
    pages: int
    per_page: int
    log: str
    checkpoints: bool

class Pages(FetchStep[PagesConfig]):
    name = "test.pages"

    async def fetch(self):
        page = self.resume_from["page"] if self.resume_from else 1
        while page <= self.config.pages:
            with open(self.config.log, "a") as log:
                log.write(f"{os.getpid()} {page}\\n")
            for i in range(self.config.per_page):
                yield {"id": f"p{page}-{i}"}
            page += 1
            if self.config.checkpoints:
                yield Checkpoint({"page": page})

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

class AppendConfig(StepConfig):
    path: str

class Append(DeliverStep[AppendConfig]):
    name = "test.append"

    def deliver(self, item):
        with open(self.config.path, "a") as out:
            out.write(item.data["id"] + "\\n")

@hookimpl
def register_step_types(register):
    register(Pages)
    register(Crash)
    register(Append)
"""


@pytest.mark.parametrize("checkpoints", [True, False], ids=["checkpoints", "no-checkpoints"])
def test_a_killed_fetch_goes_on_where_it_was(tmp_path: Path, history_url: str, checkpoints: bool) -> None:
    project = tmp_path / "project"
    (project / "plugins").mkdir(parents=True)
    (project / "workflows").mkdir()
    (project / "plugins" / "pages.py").write_text(textwrap.dedent(PLUGIN))
    pages_log, delivered = tmp_path / "pages.log", tmp_path / "delivered.txt"
    flow = project / "workflows" / "paged.yaml"
    flow.write_text(
        textwrap.dedent(
            f"""
            name: paged
            chunk_size: 10
            chunks_in_flight: 2
            steps:
              - id: read
                uses: test.pages
                with: {{pages: 6, per_page: 10, log: "{pages_log}", checkpoints: {json.dumps(checkpoints)}}}
                key: "{{{{ item.id }}}}"
              - id: crash
                uses: test.crash_once
                with: {{marker: "{tmp_path / "crashed"}", at_seq: 25}}
              - id: out
                uses: test.append
                with: {{path: "{delivered}"}}
            """
        )
    )
    run_until_killed(flow, history_url)
    first_pages = pages_log.read_text().split()
    history = History(history_url)
    run_id, result = resume_crashed(flow, project / "plugins", history)

    assert result.status == "succeeded", result.error
    items = history.items(run_id)
    keys = [i.key for i in items]
    # every item of every page once in the run, each with one outcome, delivered once
    assert sorted(keys) == sorted(f"p{p}-{i}" for p in range(1, 7) for i in range(10))
    assert {i.outcome for i in items} == {"delivered"}
    lines = delivered.read_text().split()
    assert sorted(set(lines)) == sorted(keys)
    assert len(lines) - len(set(lines)) <= 1  # only the delivery in flight at the kill (concurrency 1)
    # the resumed process asked for pages from where the ledger says the fetch was
    requested = pages_log.read_text().split("\n")[len(first_pages) // 2 :]
    resumed_pages = [int(line.split()[1]) for line in requested if line]
    assert resumed_pages, "the resumed run fetched nothing"
    if checkpoints:
        assert min(resumed_pages) >= 3  # items up to seq 25 (page 3) were in the ledger: pages 1-2 never again
    else:
        assert min(resumed_pages) == 1  # no checkpoint: from the start, the items it had dropped
    history.close()


FLAKY = """
from pathlib import Path
from automator import Checkpoint, FetchStep, StepConfig, StepError, hookimpl

class FlakyConfig(StepConfig):
    log: str
    marker: str
    fail_at: int
    retryable: bool

class Flaky(FetchStep[FlakyConfig]):
    name = "test.flaky_pages"

    async def fetch(self):
        page = self.resume_from["page"] if self.resume_from else 1
        while page <= 5:
            with open(self.config.log, "a") as log:
                log.write(f"{page}\\n")
            marker = Path(self.config.marker)
            if page == self.config.fail_at and not marker.exists():
                marker.write_text("failed")
                raise StepError("the server is busy", retryable=self.config.retryable)
            for i in range(10):
                yield {"id": f"p{page}-{i}"}
            page += 1
            yield Checkpoint({"page": page})

@hookimpl
def register_step_types(register):
    register(Flaky)
"""


def _flaky(tmp_path: Path, *, retryable: bool) -> Path:
    project = tmp_path / "project"
    (project / "plugins").mkdir(parents=True)
    (project / "workflows").mkdir()
    (project / "plugins" / "flaky.py").write_text(textwrap.dedent(FLAKY))
    flow = project / "workflows" / "flaky.yaml"
    flow.write_text(
        textwrap.dedent(
            f"""
            name: flaky
            chunk_size: 10
            steps:
              - id: read
                uses: test.flaky_pages
                retry: {{attempts: 2, backoff: 10ms}}
                with: {{log: "{tmp_path / "pages.log"}", marker: "{tmp_path / "failed"}", fail_at: 3,
                        retryable: {json.dumps(retryable)}}}
                key: "{{{{ item.id }}}}"
              - id: out
                uses: file.deliver
                with: {{path: "{tmp_path / "out.jsonl"}"}}
            """
        )
    )
    return flow


def test_a_page_that_fails_is_retried_from_the_last_checkpoint(tmp_path: Path, cli, history: History) -> None:
    result = cli("run", _flaky(tmp_path, retryable=True))
    assert result.exit_code == 0, result.stderr
    # pages 1 and 2 once; page 3 failed, then the fetch went on from its checkpoint, not from page 1
    assert (tmp_path / "pages.log").read_text().split() == ["1", "2", "3", "3", "4", "5"]
    lines = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(lines) == sorted(f"p{p}-{i}" for p in range(1, 6) for i in range(10))
    run = history.list_runs()[0]
    shown = cli("runs", "show", str(run.id), "--json").json()
    attempts = [s["status"] for s in shown["steps"] if s["step_id"] == "read"]
    assert attempts == ["failed", "succeeded"]  # the failed page is its own attempt in the history


def test_items_fetched_before_a_failure_keep_their_outcome(tmp_path: Path, cli, history: History) -> None:
    result = cli("run", _flaky(tmp_path, retryable=False))
    assert result.exit_code == 1
    assert "the server is busy" in result.stderr + result.stdout
    run = history.list_runs()[0]
    items = history.items(run.id)
    # the two pages before the failure are the run's: each item with an outcome, none lost
    assert sorted(i.key for i in items) == sorted(f"p{p}-{i}" for p in (1, 2) for i in range(10))
    assert all(i.outcome != "pending" for i in items)
