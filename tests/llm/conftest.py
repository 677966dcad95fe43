"""Fixtures for the model steps' tests: the fake OpenAI server, and a workflow runner.

``fake_openai`` is a real HTTP server on 127.0.0.1 (one per session, reset per test);
``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` point the real SDK at it.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from automator.engine.runner import RunResult, run_workflow
from automator.history.store import History
from automator.plugins.manager import Plugins, load_plugins
from automator.spec.loader import load_workflow
from tests.llm.fake_openai import FakeOpenAI

API_KEY = "sk-test-9f8e7d6c5b4a39281706f5e4d3c2b1a0"


@pytest.fixture(scope="session")
def _fake_openai_server() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture
def fake_openai(_fake_openai_server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAI:
    """The fake OpenAI server, reset, with the SDK's environment pointing at it."""
    server = _fake_openai_server
    server.reset()
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    return server


@pytest.fixture
def llm_plugins() -> Plugins:
    return load_plugins(None)


RunFlow = Callable[..., RunResult]


@pytest.fixture
def run_flow(tmp_path: Path, history: History, llm_plugins: Plugins) -> RunFlow:
    """Write items and a workflow file, run it, return the result: ``run_flow(yaml, items)``."""

    def run(text: str, items: list[dict[str, Any]] | None = None, *, trigger: str = "cli") -> RunResult:
        folder = tmp_path / "wf"
        folder.mkdir(exist_ok=True)
        if items is not None:
            (folder / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
        path = folder / "flow.yaml"
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        workflow = load_workflow(path, llm_plugins)
        return asyncio.run(run_workflow(workflow, history, llm_plugins, trigger=trigger))

    return run
