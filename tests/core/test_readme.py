"""The README's Quickstart is what a newcomer copies: keep it true."""

from __future__ import annotations

import re

from tests.conftest import REPO


def quickstart_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL)]


def test_the_quickstart_has_exactly_two_commands() -> None:
    commands = quickstart_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert quickstart_commands()[1] in ci.splitlines()


def test_the_quickstart_workflow_exists_and_is_offline() -> None:
    command = quickstart_commands()[0]
    workflow = REPO / command.split("automator run ", 1)[1].split()[0]
    text = workflow.read_text(encoding="utf-8")
    assert "http" not in text.split("steps:", 1)[1].replace("https://helpdesk.example.com/tickets", "")
