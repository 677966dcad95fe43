"""Every documented default, left out: what a first workflow gets, and what the schema offers."""

from __future__ import annotations

import json
import typing
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo
from werkzeug import Request, Response

from automator.plugins.manager import Plugins
from automator.spec.loader import load_workflow
from automator.spec.models import WorkflowSpec
from tests.conftest import REPO

MINIMAL = """
steps:
  - id: read
    uses: file.fetch
    with: {path: data.jsonl}
"""


def test_every_workflow_level_default_has_its_documented_value(write_workflow, plugins: Plugins) -> None:
    path = write_workflow(MINIMAL, name="first-flow.yaml")
    workflow = load_workflow(path, plugins)
    spec = workflow.spec
    # the table in docs/workflows.md, "Top level", in its order
    assert workflow.name == "first-flow"
    assert spec.description is None
    assert spec.schedule is None
    assert spec.max_active_runs == 1
    assert spec.on_overlap == "queue"
    assert spec.on_crash == "resume"
    assert spec.timeout is None
    assert spec.on_item_error == "continue"
    assert spec.params == {}
    assert spec.defaults.retry.attempts == 3
    assert type(spec.defaults.retry.backoff) is timedelta
    assert spec.defaults.retry.backoff == timedelta(seconds=1)
    assert type(spec.defaults.retry.max_backoff) is timedelta
    assert spec.defaults.retry.max_backoff == timedelta(minutes=1)
    assert spec.defaults.timeout is None
    assert spec.on_failure == []
    assert spec.budget is None
    step = spec.steps[0]
    assert (step.retry, step.timeout, step.key, step.only_new, step.concurrency) == (None, None, None, None, None)


def test_schedule_defaults(write_workflow, plugins: Plugins) -> None:
    path = write_workflow("schedule: {every: 15m}\n" + MINIMAL)
    schedule = load_workflow(path, plugins).spec.schedule
    assert schedule is not None
    assert schedule.timezone == "UTC"
    assert schedule.catch_up == "latest"
    assert schedule.jitter is None
    assert schedule.every == timedelta(minutes=15)


def test_a_partial_retry_block_keeps_the_other_defaults(write_workflow, plugins: Plugins) -> None:
    path = write_workflow("defaults: {retry: {attempts: 2, backoff: 10ms}}\n" + MINIMAL)
    retry = load_workflow(path, plugins).spec.defaults.retry
    assert (retry.attempts, retry.backoff, retry.max_backoff) == (2, timedelta(milliseconds=10), timedelta(minutes=1))
    assert type(retry.max_backoff) is timedelta


def _fields_with_defaults(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    return [(name, info) for name, info in model.model_fields.items() if not info.is_required()]


def _models(plugins: Plugins) -> list[type[BaseModel]]:
    """WorkflowSpec and every step type's config, with the models nested in them."""
    found: list[type[BaseModel]] = []
    todo: list[Any] = [WorkflowSpec, *(t.Config for t in plugins.step_types.values())]
    while todo:
        model = todo.pop()
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or model in found:
            if typing.get_args(model):
                todo.extend(typing.get_args(model))
            continue
        found.append(model)
        for info in model.model_fields.values():
            todo.append(info.annotation)
    return found


def test_every_default_is_a_value_its_field_accepts_as_is(plugins: Plugins) -> None:
    """A default of the wrong type (the string "1s" for a duration) is the bug of issue 8."""
    checked = 0
    for model in _models(plugins):
        for name, info in _fields_with_defaults(model):
            default = info.get_default(call_default_factory=True)
            if default is None:
                continue
            annotation = typing.Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
            adapter: TypeAdapter[Any] = TypeAdapter(annotation)
            validated = adapter.validate_python(default)
            assert validated == default, f"{model.__name__}.{name}: default {default!r} becomes {validated!r}"
            assert type(validated) is type(default), f"{model.__name__}.{name}: default {default!r} is not parsed"
            checked += 1
    assert checked > 20


def _flaky(responses: list[int]):
    calls: list[int] = []

    def handler(request: Request) -> Response:
        status = responses[min(len(calls), len(responses) - 1)]
        calls.append(status)
        if status != 200:
            return Response("busy", status=status)
        return Response(json.dumps([{"id": 1}, {"id": 2}]), content_type="application/json")

    return handler, calls


@pytest.mark.parametrize(
    "retry",
    [
        "",  # no retry block at all: 3 attempts, 1s backoff
        "defaults: {retry: {attempts: 2, backoff: 10ms}}\n",  # a partial one: max_backoff from the default
        "defaults: {timeout: 10s}\n",  # defaults without retry
    ],
)
def test_a_503_is_retried_under_the_default_retry_policy(cli, write_workflow, httpserver, retry: str) -> None:
    handler, calls = _flaky([503, 200])
    httpserver.expect_request("/tickets").respond_with_handler(handler)
    path = write_workflow(
        retry
        + f"""
steps:
  - id: get
    uses: http.fetch
    with: {{url: "{httpserver.url_for("/tickets")}"}}
  - id: write
    uses: file.deliver
    with: {{path: out.jsonl}}
"""
    )
    run = cli("run", path, "--json").json()
    assert run["status"] == "succeeded", run
    assert calls == [503, 200]
    assert run["items"]["delivered"] == 2
    assert "total_seconds" not in json.dumps(run)


# --- the JSON Schema ---------------------------------------------------------------------


def test_the_shipped_schema_is_what_automator_schema_prints(cli) -> None:
    shipped = (REPO / "workflow.schema.json").read_text(encoding="utf-8")
    printed = cli("schema", "--builtin-only")
    assert printed.exit_code == 0, printed.stderr
    assert printed.stdout == shipped, "workflow.schema.json is stale: run `automator schema --builtin-only -o ...`"
    assert cli("schema", "--builtin-only").stdout == printed.stdout  # stable from one call to the next


# what each standard step type requires (no default); all else comes from the schema's defaults
REQUIRED: dict[str, dict[str, Any]] = {
    "file.fetch": {"path": "items.jsonl"},
    "http.fetch": {"url": "https://example.com/items"},
    "template.transform": {"template": "{{ item }}"},
    "openai.transform": {"instructions": "Summarize."},
    "schema.validate": {"schema": {"type": "object"}},
    "file.deliver": {"path": "out.jsonl"},
    "webhook.deliver": {"url": "https://example.com/hook"},
}


def _defaults(node: Any, where: str = "#") -> list[tuple[str, Any, dict[str, Any]]]:
    found: list[tuple[str, Any, dict[str, Any]]] = []
    if isinstance(node, dict):
        if "properties" in node and isinstance(node["properties"], dict):
            for key, sub in node["properties"].items():
                if isinstance(sub, dict) and "default" in sub:
                    found.append((f"{where}/properties/{key}", sub["default"], sub))
        for key, sub in node.items():
            found.extend(_defaults(sub, f"{where}/{key}"))
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            found.extend(_defaults(sub, f"{where}/{i}"))
    return found


def test_every_schema_default_is_accepted_by_the_schema_and_by_validate(cli, write_workflow) -> None:
    plugins = Plugins()  # the shipped schema has the standard step types, whatever else is installed
    plugins.load_builtins()
    schema = json.loads((REPO / "workflow.schema.json").read_text(encoding="utf-8"))
    defaults = _defaults(schema)
    assert any(where.endswith("config.http.fetch/properties/timeout") for where, _, _ in defaults)
    for _, default, sub in defaults:
        # against the property's own schema (with the shared $defs for its $refs)
        jsonschema.validate(default, {**sub, "$defs": schema["$defs"]})

    # and through our own loader, in a file: every top-level, retry, schedule and step default
    top = {w.rsplit("/", 1)[1]: d for w, d, _ in defaults if w.startswith("#/properties/")}
    retry = {w.rsplit("/", 1)[1]: d for w, d, _ in defaults if "/RetryPolicy/" in w}
    schedule = {w.rsplit("/", 1)[1]: d for w, d, _ in defaults if "/Schedule/" in w}
    data: dict[str, Any] = {
        **{k: v for k, v in top.items() if v is not None},
        "schedule": {"every": "1h", **{k: v for k, v in schedule.items() if v is not None}},
        "defaults": {"retry": {k: v for k, v in retry.items() if v is not None}},
        "steps": [],
    }
    phases = ["fetch", "transform", "validate", "deliver"]
    for name in sorted(plugins.step_types, key=lambda n: (phases.index(str(plugins.step_types[n].phase)), n)):
        config = {
            **REQUIRED.get(name, {}),
            **{
                w.rsplit("/", 1)[1]: d
                for w, d, _ in defaults
                if w.startswith(f"#/$defs/config.{name}/properties/") and d is not None
            },
        }
        data["steps"].append({"id": f"s{len(data['steps'])}", "uses": name, "with": config})
    jsonschema.validate(data, schema)  # the defaults together, in one file
    path = write_workflow(json.dumps(data, indent=2), name="defaults.yaml")
    result = cli("validate", path)
    assert result.exit_code == 0, result.stderr


PLUGIN_WITH_TEXT_DEFAULTS = """
from pydantic import Field

from automator import Duration, FetchStep, StepConfig, hookimpl


class PollConfig(StepConfig):
    every: Duration = Field("30s", description="A default written as a workflow file would.")


class Poll(FetchStep[PollConfig]):
    name = "poll.fetch"

    def fetch(self):
        return [{"seconds": self.config.every.total_seconds()}]


@hookimpl
def register_step_types(register):
    register(Poll)
"""


def test_a_plugin_default_written_as_text_is_parsed(cli, write_workflow, workflow_dir: Path) -> None:
    """A plugin author may write a duration default as "30s": it is parsed, not left a string."""
    plugins_dir = workflow_dir.parent / "plugins"
    plugins_dir.mkdir()
    (plugins_dir / "poll.py").write_text(PLUGIN_WITH_TEXT_DEFAULTS, encoding="utf-8")
    path = write_workflow(
        """
        steps:
          - id: poll
            uses: poll.fetch
          - id: write
            uses: file.deliver
            with: {path: out.jsonl}
        """
    )
    run = cli("run", path, "--json").json()
    assert run["status"] == "succeeded", run
    assert json.loads((path.parent / "out.jsonl").read_text(encoding="utf-8")) == {"seconds": 30.0}
