"""The plugin, workflow and test shown in docs/plugins.md work exactly as printed."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from automator.testing import WorkflowRunner

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOCS.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)


@pytest.fixture
def acme_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The guide's plugin, importable as ``acme_status`` like an installed module."""
    source = code_blocks("python")[0]
    assert "class Incidents(FetchStep" in source, "the guide's first code block should be the example plugin"
    (tmp_path / "acme_status.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import acme_status

    yield acme_status
    sys.modules.pop("acme_status", None)


def test_the_guides_plugin_runs_the_guides_workflow(
    acme_status: Any, automator_runner: WorkflowRunner, httpserver: HTTPServer
) -> None:
    httpserver.expect_request("/incidents.json", query_string={"token": "st4tus-token"}).respond_with_json(
        {
            "incidents": [
                {"id": 7, "title": "Checkout errors", "severity": "major", "status": "investigating"},
                {"id": 6, "title": "Slow search", "severity": "minor", "status": "resolved"},
            ]
        }
    )
    posted: list[Any] = []

    keys: list[str] = []

    def room(request: Request) -> Response:
        posted.append(request.get_json())
        keys.append(request.headers["Idempotency-Key"])
        return Response("ok")

    httpserver.expect_request("/room", method="POST").respond_with_handler(room)
    workflow = code_blocks("yaml")[0].replace("https://status.example.com", httpserver.url_for("").rstrip("/"))
    assert "token={{ secrets.STATUS_TOKEN }}" in workflow

    # the guide's fetch renders its URL's template (no item: params, secrets, run)
    secrets = {"ROOM_WEBHOOK": httpserver.url_for("/room"), "STATUS_TOKEN": "st4tus-token"}

    result = automator_runner.run(workflow, plugins=[acme_status], secrets=secrets)
    again = automator_runner.run(workflow, plugins=[acme_status], secrets=secrets)

    assert result.status == "succeeded", result.error
    assert posted == [{"text": "[major] Checkout errors"}]
    assert len(keys) == 1 and len(keys[0]) == 32  # the idempotency key the built-ins send
    assert again.outcomes["skipped"] == 1  # the key keeps it from being posted twice
    assert result.plugins.infos["acme_status"].steps[0].name == "acme.incidents"


def test_the_guides_test_passes(acme_status: Any, automator_runner: WorkflowRunner, httpserver: HTTPServer) -> None:
    [source] = [block for block in code_blocks("python") if "def test_posts_open_incidents" in block]
    namespace: dict[str, Any] = {}
    exec(compile(source, "docs/plugins.md", "exec"), namespace)

    namespace["test_posts_open_incidents"](automator_runner, httpserver)


@pytest.mark.parametrize("number", range(len(code_blocks("python"))))
def test_every_python_example_in_the_guide_compiles(number: int) -> None:
    compile(code_blocks("python")[number], f"docs/plugins.md (python block {number + 1})", "exec")
