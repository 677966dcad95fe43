"""What the history records when a step fails: the real error, never an empty text."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

FAILING_STEPS = """
from automator import StepConfig, StepError, TransformStep, hookimpl

class FailConfig(StepConfig):
    how: str

class Fail(TransformStep[FailConfig]):
    name = "test.fail"
    tries = 0

    def transform(self, item):
        Fail.tries += 1
        if self.config.how == "busy":
            raise StepError("the receiver is busy (try %d)" % Fail.tries)   # retryable
        if self.config.how == "silent":
            raise StepError("", retryable=False)
        if self.config.how == "wrapped":
            try:
                raise OSError(28, "No space left on device")
            except OSError as exc:
                raise RuntimeError() from exc
        raise ConnectionResetError()

@hookimpl
def register_step_types(register):
    register(Fail)
"""


@pytest.fixture
def project(workflow_dir: Path) -> Path:
    plugins = workflow_dir.parent / "plugins"
    plugins.mkdir()
    (plugins / "failing.py").write_text(textwrap.dedent(FAILING_STEPS))
    (workflow_dir / "items.jsonl").write_text(json.dumps({"id": 1}) + "\n")
    return workflow_dir


def failing_flow(project: Path, how: str, retry: str) -> Path:
    path = project / f"{how}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            {retry}
            steps:
              - id: read
                uses: file.fetch
                with: {{path: items.jsonl}}
              - id: work
                uses: test.fail
                with: {{how: {how}}}
            """
        )
    )
    return path


def item_reason(cli, run_id: int) -> str:
    (failed,) = cli("runs", "show", str(run_id), "--json").json()["failed"]
    return failed["reason"]


@pytest.mark.parametrize(
    "retry",
    [
        "defaults: {retry: {attempts: 2, backoff: 10ms}}",  # a partial policy: max_backoff is the default
        "defaults: {retry: {attempts: 3, backoff: 10ms, max_backoff: 20ms}}",
    ],
)
def test_a_retryable_error_is_retried_and_its_real_message_recorded(cli, project: Path, retry: str) -> None:
    run = cli("run", failing_flow(project, "busy", retry), "--json").json()
    attempts = int(retry.split("attempts: ")[1].split(",")[0])
    assert run["status"] == "failed"
    assert item_reason(cli, run["id"]) == f"the receiver is busy (try {attempts})"  # the last try's own words
    step = cli("runs", "show", str(run["id"]), "--json").json()["steps"][1]
    assert step["retries"] == attempts - 1


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("silent", "StepError"),
        ("wrapped", "RuntimeError (caused by OSError: [Errno 28] No space left on device)"),
        ("reset", "ConnectionResetError"),
    ],
)
def test_an_error_without_a_message_is_named_by_its_type(cli, project: Path, how: str, reason: str) -> None:
    run = cli("run", failing_flow(project, how, "defaults: {retry: {attempts: 1}}"), "--json").json()
    assert run["status"] == "failed"
    assert item_reason(cli, run["id"]) == reason
    assert run["error"] == f"1 item(s) failed; first: {reason}"
