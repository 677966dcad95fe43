"""One plugins folder per command, a command line built per call, hooks called through pluggy."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest

from automator import FetchStep, RunStarted, StepConfig, hookimpl
from automator.cli.main import cli as builtin_commands
from automator.testing import CliResult, WorkflowRunner
from tests.conftest import run_console
from tests.plugins_api.conftest import unique

GOOD_PLUGIN = """
from automator import FetchStep, StepConfig, hookimpl


class Numbers(FetchStep[StepConfig]):
    name = "good.numbers"

    def fetch(self):
        return [{"n": 1}, {"n": 2}]


@hookimpl
def register_step_types(register):
    register(Numbers)
"""

BROKEN_PLUGIN = "import no_such_module_anywhere\n"

FLOW = """
steps:
  - {id: src, uses: good.numbers}
  - {id: out, uses: file.deliver, with: {path: out.jsonl}}
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project (workflows/ and plugins/ side by side) and, as the current folder, an unrelated one."""
    root = tmp_path / "project"
    write(root / "workflows" / "flow.yaml", FLOW)
    write(root / "plugins" / "good.py", GOOD_PLUGIN)
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "plugins" / "stray.py", BROKEN_PLUGIN)  # a plugins/ folder with no workflows/ beside it
    monkeypatch.chdir(elsewhere)
    return root


def names(result: CliResult) -> set[str]:
    return {entry["name"] for entry in result.json()}


# --- one rule for the plugins folder -------------------------------------------------------


def test_every_command_uses_the_plugins_beside_the_workflows_and_nothing_of_the_current_folder(
    project: Path, cli: Callable[..., CliResult]
) -> None:
    flow = project / "workflows" / "flow.yaml"

    ran = cli("run", flow)
    validated = cli("validate", project / "workflows")
    listed = cli("plugins", "--workflows", project / "workflows", "--json")
    schema = cli("schema", "--workflows", project / "workflows")
    checked = cli("daemon", "--workflows", project / "workflows", "--check")
    here = cli("plugins", "--json")

    assert ran.exit_code == 0, ran.stderr
    assert (project / "workflows" / "out.jsonl").read_text().count("\n") == 2
    assert validated.exit_code == 0 and checked.exit_code == 0, validated.stderr + checked.stderr
    assert "good" in names(listed) and "stray" not in names(listed)
    assert "good.numbers" in json.dumps(json.loads(schema.stdout))
    # ./plugins has no workflows/ beside it: it belongs to no workflow, and no command loads it
    assert "stray" not in names(here) and "good" not in names(here)
    for result in (ran, validated, listed, schema, checked, here):
        assert "stray" not in result.stderr and "no_such_module" not in result.stderr


def test_plugins_and_schema_default_to_the_daemons_workflows_folder(
    project: Path, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)

    assert "good" in names(cli("plugins", "--json"))
    assert "good.numbers" in cli("schema").stdout
    assert cli("daemon", "--check").exit_code == 0


def test_plugins_dir_option_wins_for_every_command(
    project: Path, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    other = tmp_path / "other-plugins"
    write(other / "good.py", GOOD_PLUGIN.replace("good.numbers", "other.numbers"))
    write(project / "workflows" / "other.yaml", FLOW.replace("good.numbers", "other.numbers"))

    assert cli("--plugins-dir", other, "validate", project / "workflows" / "other.yaml").exit_code == 0
    assert cli("--plugins-dir", other, "validate", project / "workflows" / "flow.yaml").exit_code == 1
    assert "other.numbers" in cli("--plugins-dir", other, "schema").stdout


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_broken_plugin_is_reported_once_in_one_format(project: Path, command: str, tmp_path: Path) -> None:
    write(project / "plugins" / "broken.py", BROKEN_PLUGIN)
    env = {**os.environ, "AUTOMATOR_DATABASE_URL": f"sqlite:///{tmp_path / 'history.db'}"}

    # the console script, from the project's folder: the commands' own plugins are the project's too
    result = run_console(command, str(project / "workflows" / "flow.yaml"), env=env, cwd=project)

    assert result.returncode == 0, result.stderr
    mentions = [line for line in result.stderr.splitlines() if "broken" in line]
    assert mentions == [
        "warning: plugin broken was skipped: ModuleNotFoundError: No module named 'no_such_module_anywhere' "
        f"({project / 'plugins' / 'broken.py'}, line 1)"
    ]


# --- the command line is built per call ------------------------------------------------------


def command_plugin(folder: Path, command: str) -> Path:
    return write(
        folder / f"{command.replace('-', '_')}.py",
        f"""
        import click
        from automator import hookimpl

        @hookimpl
        def register_commands(cli):
            cli.add_command(click.Command({command!r}, callback=lambda: click.echo({command!r})))
        """,
    )


def test_plugin_commands_do_not_outlive_the_call_that_loaded_them(
    tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    first, second = unique("first-cmd").replace("_", "-"), unique("second-cmd").replace("_", "-")
    command_plugin(tmp_path / "a", first)
    command_plugin(tmp_path / "b", second)
    before = dict(builtin_commands.commands)

    with_a = cli("--plugins-dir", tmp_path / "a", "--help")
    with_b = cli("--plugins-dir", tmp_path / "b", "--help")

    assert first in with_a.stdout and second not in with_a.stdout
    assert second in with_b.stdout and first not in with_b.stdout
    assert cli("--plugins-dir", tmp_path / "b", first).exit_code == 2  # no such command
    assert dict(builtin_commands.commands) == before


# --- automator_cli, the fixture for plugin authors -------------------------------------------


@click.command("acme-check")
@click.option("--fail", is_flag=True)
def acme_check(fail: bool) -> None:
    import os
    import sys

    click.echo(f"region={os.environ.get('ACME_REGION', 'unset')}")
    if fail:
        sys.exit(1)


class AcmeCommands:
    @hookimpl
    def register_commands(self, cli: click.Group) -> None:
        cli.add_command(acme_check)


def test_sys_exit_in_a_plugin_command_is_its_exit_code(automator_cli: Callable[..., CliResult]) -> None:
    failed = automator_cli("acme-check", "--fail", plugins=[AcmeCommands()])
    passed = automator_cli("acme-check", plugins=[AcmeCommands()])

    assert (failed.exit_code, failed.stdout) == (1, "region=unset\n")
    assert passed.exit_code == 0


def test_env_sets_variables_for_one_call(automator_cli: Callable[..., CliResult]) -> None:
    inside = automator_cli("acme-check", plugins=[AcmeCommands()], env={"ACME_REGION": "eu"})
    after = automator_cli("acme-check", plugins=[AcmeCommands()])

    assert inside.stdout == "region=eu\n"
    assert after.stdout == "region=unset\n"


class Letters(FetchStep[StepConfig]):
    name = "acme.letters"

    def fetch(self) -> list[dict[str, Any]]:
        return [{"letter": "a"}, {"letter": "b"}]


class LettersPlugin:
    @hookimpl
    def register_step_types(self, register: Any) -> None:
        register(Letters)


def test_plugins_given_to_automator_cli_provide_step_types_too(
    automator_cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    flow = write(tmp_path / "wf" / "letters.yaml", "steps:\n  - {id: src, uses: acme.letters}\n")

    result = automator_cli("run", flow, "--json", plugins=[LettersPlugin()])

    assert result.exit_code == 0, result.stderr
    assert result.json()["items"]["fetched"] == 2


# --- hooks go through pluggy ----------------------------------------------------------------


def test_pluggys_tracing_sees_every_hook_call(automator_runner: WorkflowRunner) -> None:
    called: list[str] = []
    plugins = automator_runner.plugins(secrets={"TOKEN": "t0ken-value"})
    undo = plugins.pm.add_hookcall_monitoring(lambda name, impls, kwargs: called.append(name), lambda *a: None)

    workflow = automator_runner.load(
        """
        steps:
          - {id: src, uses: test.fetch, with: {items: [{"n": 1}]}}
          - {id: out, uses: test.deliver, with: {fail_when: "{{ secrets.TOKEN == 'no' }}"}}
        """,
        plugins=plugins,
    )
    import asyncio

    from automator.engine.runner import run_workflow

    asyncio.run(run_workflow(workflow, automator_runner.history, plugins))
    undo()

    assert called.count("workflow_loaded") == 1
    assert called.count("run_started") == called.count("run_finished") == 1
    assert called.count("step_started") == called.count("step_finished") == 2
    assert called.count("item_outcome") == 1
    assert called.count("get_secret") >= 1


def test_a_listener_that_fails_first_does_not_keep_the_others_from_hearing(
    automator_runner: WorkflowRunner, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[str] = []

    class Quiet:
        @hookimpl
        def run_started(self, event: RunStarted) -> None:
            heard.append("quiet")

    class Loud:  # registered last, so pluggy calls it first
        @hookimpl(tryfirst=True)
        def run_started(self, event: RunStarted) -> None:
            raise RuntimeError("pager down")

    result = automator_runner.run(
        "steps:\n  - {id: src, uses: test.fetch, with: {items: [{n: 1}]}}\n", plugins=[Quiet(), Loud()]
    )

    assert result.status == "succeeded"
    assert heard == ["quiet"]
    assert len(result.events_of(RunStarted)) == 1  # the fixture's recorder heard it too
    assert any(
        "plugin Loud: run_started listener failed: RuntimeError: pager down" in r.getMessage() for r in caplog.records
    )


def test_the_first_secrets_provider_with_an_answer_ends_the_call(automator_runner: WorkflowRunner) -> None:
    asked: list[str] = []

    class Vault:
        @hookimpl
        def get_secret(self, name: str) -> str | None:
            asked.append("vault")
            return None

    class Keyring:
        @hookimpl(tryfirst=True)
        def get_secret(self, name: str) -> str | None:
            asked.append("keyring")
            return "from-keyring" if name == "TOKEN" else None

    plugins = automator_runner.plugins([Vault(), Keyring()], entry_points=False)

    assert plugins.get_secret("TOKEN") == "from-keyring"
    assert asked == ["keyring"]
