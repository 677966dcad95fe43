"""workflow_loaded policies, plugin CLI commands, and plugin step configs in the JSON Schema."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest

from automator import Workflow, WorkflowFileError, hookimpl
from automator.plugins.manager import load_plugins
from automator.spec.schema import workflow_json_schema
from automator.testing import WorkflowRunner
from tests.plugins_api.conftest import unique

POLICY_PLUGIN = """
from urllib.parse import urlparse

from automator import Rejection, hookimpl


@hookimpl
def workflow_loaded(workflow):
    problems = []
    for step in workflow.steps:
        if step.type.name == "webhook.deliver":
            host = urlparse(str(step.config.url)).hostname or ""
            if not host.endswith("example.com"):
                problems.append(Rejection(f"webhooks may only go to *.example.com, not {host}", step=step.id, field="url"))
    if not workflow.spec.description:
        problems.append("every workflow needs a description")
    return problems
"""

WORKFLOW = """\
name: leaky
steps:
  - {id: src, uses: test.fetch, with: {items: [{a: 1}]}}
  - id: out
    uses: webhook.deliver
    with:
      url: https://evil.test/hook
"""


def test_policy_rejects_with_file_line_col_and_plugin_name(
    automator_runner: WorkflowRunner, plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    write_plugin("domain_policy", POLICY_PLUGIN)
    plugins = automator_runner.plugins()
    plugins.load_directory(plugins_dir)
    path = automator_runner.write("leaky.yaml", WORKFLOW)

    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(path, plugins=plugins)

    assert [str(p) for p in caught.value.problems] == [
        f"{path}:1:1: every workflow needs a description (plugin domain_policy)",
        f"{path}:7:12: webhooks may only go to *.example.com, not evil.test (plugin domain_policy)",
    ]


def test_validate_command_reports_policy_problems(
    cli: Callable[..., Any], plugins_dir: Path, write_plugin: Callable[[str, str], Path], tmp_path: Path
) -> None:
    write_plugin("domain_policy", POLICY_PLUGIN)
    path = tmp_path / "leaky.yaml"
    path.write_text(WORKFLOW.replace("test.fetch, with: {items: [{a: 1}]}", "file.fetch, with: {path: x.json}"))

    result = cli("--plugins-dir", plugins_dir, "validate", path)

    assert result.exit_code == 1
    assert f"{path}:7:12: webhooks may only go to *.example.com, not evil.test (plugin domain_policy)" in result.stderr


def test_policy_accepts_a_compliant_workflow(
    automator_runner: WorkflowRunner, plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    write_plugin("domain_policy", POLICY_PLUGIN)
    plugins = automator_runner.plugins()
    plugins.load_directory(plugins_dir)
    compliant = "description: posts to our own chat\n" + WORKFLOW.replace("evil.test", "hooks.example.com")

    workflow = automator_runner.load(compliant, plugins=plugins)

    assert [s.id for s in workflow.steps] == ["src", "out"]
    assert plugins.infos["domain_policy"].hooks == ["workflow_loaded"]


def test_policy_can_adjust_a_workflow(automator_runner: WorkflowRunner) -> None:
    class StampEveryDelivery:
        """Adjusts instead of rejecting: every test.deliver step fails items marked 'blocked'."""

        @hookimpl
        def workflow_loaded(self, workflow: Workflow) -> None:
            for step in workflow.steps:
                if step.type.name == "test.deliver":
                    step.config = type(step.config).model_validate({"fail_when": "{{ item.blocked | default(false) }}"})

    result = automator_runner.run(
        """
        steps:
          - {id: src, uses: test.fetch, with: {items: [{n: 1}, {n: 2, blocked: true}]}}
          - {id: out, uses: test.deliver}
        """,
        plugins=[StampEveryDelivery()],
    )

    assert result.delivered["out"] == [{"n": 1}]
    assert result.outcomes["failed"] == 1


def test_a_crashing_policy_is_a_problem_of_the_file_naming_the_plugin(automator_runner: WorkflowRunner) -> None:
    class Crashing:
        @hookimpl
        def workflow_loaded(self, workflow: Workflow) -> None:
            raise LookupError("policy table missing")

    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(WORKFLOW, plugins=[Crashing()])

    [problem] = caught.value.problems
    assert (problem.line, problem.column) == (1, 1)
    assert problem.message.startswith(
        "plugin Crashing failed while checking the workflow: LookupError: policy table missing"
    )


# --- register_commands --------------------------------------------------------------------


def test_plugin_command_from_the_plugins_directory(
    cli: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = unique("acme-hello").replace("_", "-")
    (tmp_path / "plugins").mkdir()
    (tmp_path / "workflows").mkdir()
    (tmp_path / "plugins" / "acme_cli.py").write_text(
        f"""
import click
from automator import hookimpl
from automator.cli.common import settings


@click.command({name!r})
@click.argument("who")
@click.pass_context
def hello(ctx, who):
    \"\"\"Say hello, and how many runs the history holds.\"\"\"
    runs = settings(ctx).history().list_runs()
    click.echo(f"hello {{who}}, {{len(runs)}} runs")


@hookimpl
def register_commands(cli):
    cli.add_command(hello)
"""
    )
    monkeypatch.chdir(tmp_path)  # plugins/ beside workflows/, as `automator` looks for it

    result = cli(name, "ops")
    listed = cli("--help")

    assert (result.exit_code, result.stdout) == (0, "hello ops, 0 runs\n"), result.stderr
    assert name in listed.stdout


def test_plugin_command_from_plugins_dir_option(
    cli: Callable[..., Any], plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    name = unique("acme-version").replace("_", "-")
    write_plugin(
        "acme_version",
        f"""
        import click
        from automator import hookimpl

        @hookimpl
        def register_commands(cli):
            cli.add_command(click.Command({name!r}, callback=lambda: click.echo("acme 1.0")))
        """,
    )

    assert cli("--plugins-dir", plugins_dir, name).stdout == "acme 1.0\n"
    assert cli(f"--plugins-dir={plugins_dir}", name).stdout == "acme 1.0\n"


def test_plugin_command_through_the_shipped_fixture(automator_cli: Callable[..., Any]) -> None:
    @click.command("acme-ping")
    def ping() -> None:
        click.echo("pong")

    class Commands:
        @hookimpl
        def register_commands(self, cli: click.Group) -> None:
            cli.add_command(ping)

    result = automator_cli("acme-ping", plugins=[Commands()])
    after = automator_cli("acme-ping")

    assert (result.exit_code, result.stdout) == (0, "pong\n")
    assert after.exit_code != 0  # added for that call only


def test_a_plugin_failing_to_add_commands_does_not_stop_the_cli(
    cli: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "bad_cli.py").write_text(
        "from automator import hookimpl\n\n@hookimpl\ndef register_commands(cli):\n    raise RuntimeError('boom')\n"
    )
    (tmp_path / "workflows").mkdir()
    monkeypatch.chdir(tmp_path)

    result = cli("runs", "--json")

    assert (result.exit_code, result.stdout.strip()) == (0, "[]")
    assert any("plugin bad_cli: register_commands failed: RuntimeError: boom" in r.getMessage() for r in caplog.records)


# --- the JSON Schema includes third-party step configs --------------------------------------


THIRD_PARTY_STEP = """
from typing import Literal
from pydantic import Field
from automator import DeliverStep, StepConfig, hookimpl


class PagerConfig(StepConfig):
    service: str = Field(description="The pager service key to alert.")
    severity: Literal["info", "warning", "critical"] = Field("warning", description="How loud the page is.")


class Pager(DeliverStep[PagerConfig]):
    name = "acme.pager"
    description = "Page the on-call person for each item."

    def deliver(self, item):
        pass


@hookimpl
def register_step_types(register):
    register(Pager)
"""


def test_schema_includes_third_party_step_configs_with_descriptions(
    plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    write_plugin("acme_pager", THIRD_PARTY_STEP)

    schema = workflow_json_schema(load_plugins(plugins_dir))

    assert "acme.pager" in schema["$defs"]["StepSpec"]["properties"]["uses"]["enum"]
    config = schema["$defs"]["config.acme.pager"]
    assert config["description"] == "acme.pager (deliver): Page the on-call person for each item."
    assert config["properties"]["service"]["description"] == "The pager service key to alert."
    assert config["properties"]["severity"]["enum"] == ["info", "warning", "critical"]
    assert config["required"] == ["service"]
    assert config["additionalProperties"] is False
    branch = next(
        b for b in schema["$defs"]["StepSpec"]["allOf"] if b["if"]["properties"]["uses"]["const"] == "acme.pager"
    )
    assert branch["then"]["properties"]["with"]["$ref"] == "#/$defs/config.acme.pager"


def test_schema_command_includes_third_party_steps_and_checks_them(
    cli: Callable[..., Any], plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    import jsonschema

    write_plugin("acme_pager", THIRD_PARTY_STEP)

    result = cli("--plugins-dir", plugins_dir, "schema")

    assert result.exit_code == 0, result.stderr
    schema = result.json()
    validator = jsonschema.Draft202012Validator(schema)
    good = {"steps": [{"id": "p", "uses": "acme.pager", "with": {"service": "db"}}]}
    bad = {"steps": [{"id": "p", "uses": "acme.pager", "with": {"severity": "loud"}}]}
    assert list(validator.iter_errors(good)) == []
    messages = sorted(e.message for e in validator.iter_errors(bad))
    assert any("'service' is a required property" in m for m in messages), messages
    assert any("'loud' is not one of" in m for m in messages), messages
