"""Fixtures for the core's tests: a fresh history database per test, the CLI in-process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from automator.cli.main import main
from automator.engine.runner import RunResult
from automator.history.store import History
from automator.plugins.manager import Plugins, load_plugins
from automator.testing import CliResult

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def history_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite history for this test, also what the CLI uses."""
    url = f"sqlite:///{tmp_path / 'history.db'}"
    monkeypatch.setenv("AUTOMATOR_DATABASE_URL", url)
    monkeypatch.setenv("COLUMNS", "200")
    return url


@pytest.fixture
def history(history_url: str) -> Iterator[History]:
    store = History(history_url)
    yield store
    store.close()


@pytest.fixture
def plugins() -> Plugins:
    return load_plugins(None)


@dataclass
class Cli:
    """Runs ``automator ...`` in this process, as the console script would."""

    capsys: pytest.CaptureFixture[str]

    def __call__(self, *args: str | Path) -> CliResult:
        self.capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = self.capsys.readouterr()
        return CliResult(code, out, err)


@pytest.fixture
def cli(history_url: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


@pytest.fixture
def workflow_dir(tmp_path: Path) -> Path:
    """A folder for workflow files (with plugins/ beside it, as in a real project)."""
    folder = tmp_path / "project" / "workflows"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def write_workflow(workflow_dir: Path):
    """Write a workflow file from (dedented) YAML text; returns its path."""

    def write(text: str, name: str = "flow.yaml") -> Path:
        path = workflow_dir / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write


def run_console(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The real console script in a subprocess: for exit codes and 'no traceback' checks."""
    return subprocess.run(
        [sys.executable, "-m", "automator.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def run_until_killed(flow: Path, history_url: str) -> None:
    """Run a workflow in its own process that is expected to die by SIGKILL mid-run."""
    done = subprocess.run(
        [sys.executable, "-m", "automator.cli.main", "run", str(flow)],
        env={**os.environ, "AUTOMATOR_DATABASE_URL": history_url},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -9, done.stderr


def resume_crashed(flow: Path, plugins_dir: Path, history: History) -> tuple[int, RunResult]:
    """Resume the newest run, still ``running`` after its process died: (run id, result)."""
    import asyncio

    from automator import load_workflow
    from automator.engine.runner import Run

    crashed = history.list_runs()[0]
    assert crashed.status == "running"  # nobody was left to say otherwise
    plugins = load_plugins(plugins_dir)
    return crashed.id, asyncio.run(Run(load_workflow(flow, plugins), history, plugins).resume(crashed.id))
