"""The secrets hook and the template filter and global hooks, in real runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from automator import WorkflowFileError, hookimpl
from automator.plugins.manager import load_plugins
from automator.testing import WorkflowRunner
from tests.plugins_api.conftest import unique

SECRET = "s3cr3t-vault-value"


class Vault:
    """A secrets provider that knows some names and remembers what it was asked."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.asked: list[str] = []

    @hookimpl
    def get_secret(self, name: str) -> str | None:
        self.asked.append(name)
        return self.values.get(name)


def deliver_secret_workflow(name: str) -> str:
    # the secret ends up in the item, and a failing delivery quotes the item: both must be redacted
    return f"""
        steps:
          - {{id: src, uses: test.fetch, with: {{items: [{{n: 1}}]}}}}
          - id: add
            uses: template.transform
            with:
              mapping: {{n: "{{{{ item.n }}}}", token: "{{{{ secrets.{name} }}}}"}}
          - {{id: out, uses: test.deliver, with: {{fail_when: "{{{{ item.token | length > 0 }}}}"}}}}
        """


def test_secret_comes_from_the_plugin_and_is_redacted_everywhere(automator_runner: WorkflowRunner) -> None:
    vault = Vault({"API_TOKEN": SECRET})

    result = automator_runner.run(deliver_secret_workflow("API_TOKEN"), plugins=[vault], secrets={})

    assert vault.asked == ["API_TOKEN"]
    assert result.outcomes["failed"] == 1
    recorded = json.dumps(
        [[i.data, i.result, i.reason] for i in result.items] + [[s.error, s.summary] for s in result.steps],
        default=str,
    )
    assert "token" in recorded and "***" in recorded
    assert SECRET not in recorded
    assert SECRET not in str(result.events)


def test_first_provider_with_an_answer_wins_then_the_environment(
    automator_runner: WorkflowRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = Vault({}), Vault({"A": "from-second", "B": "second-b"})

    class Preferred:
        @hookimpl(tryfirst=True)
        def get_secret(self, name: str) -> str | None:
            return "from-preferred" if name == "A" else None

    monkeypatch.setenv("AUTOMATOR_SECRET_C", "from-env")
    result = automator_runner.run(
        """
        steps:
          - {id: src, uses: test.fetch, with: {items: [{}]}}
          - id: t
            uses: template.transform
            with: {mapping: {a: "{{ secrets.A }}", b: "{{ secrets.B }}", c: "{{ secrets.C }}"}}
          - {id: out, uses: test.deliver}
        """,
        plugins=[second, first, Preferred()],
    )

    assert result.delivered["out"] == [{"a": "from-preferred", "b": "second-b", "c": "from-env"}]
    # the latest registered is asked first (tryfirst before all); an answer ends the search
    assert first.asked == ["B", "C"]
    assert second.asked == ["B", "C"]


def test_a_failing_secrets_plugin_fails_the_item_without_leaking(automator_runner: WorkflowRunner) -> None:
    class BrokenVault:
        @hookimpl
        def get_secret(self, name: str) -> str | None:
            raise ConnectionError(f"vault at https://user:{SECRET}@vault.local unreachable")

    result = automator_runner.run(
        """
        defaults: {retry: {attempts: 1}}
        steps:
          - {id: src, uses: test.fetch, with: {items: [{}]}}
          - {id: t, uses: template.transform, with: {mapping: {a: "{{ secrets.A }}"}}}
        """,
        plugins=[BrokenVault()],
    )

    [item] = result.items
    assert item.outcome == "failed"
    assert "secrets plugin BrokenVault failed to provide 'A' (ConnectionError)" in (item.reason or "")
    assert SECRET not in (item.reason or "")


# --- template filters and globals ---------------------------------------------------------


def test_filter_from_a_plugin_works_in_templates(automator_runner: WorkflowRunner) -> None:
    name = unique("reverse")

    class Filters:
        @hookimpl
        def register_template_filters(self, register: Callable[[str, Callable[..., Any]], None]) -> None:
            register(name, lambda value, times=1: str(value)[::-1] * times)

    result = automator_runner.run(
        f"""
        steps:
          - {{id: src, uses: test.fetch, with: {{items: [{{w: abc}}]}}}}
          - {{id: t, uses: template.transform, with: {{mapping: {{r: "{{{{ item.w | {name}(2) }}}}"}}}}}}
          - {{id: out, uses: test.deliver}}
        """,
        plugins=[Filters()],
    )

    assert result.delivered["out"] == [{"r": "cbacba"}]
    assert result.plugins.infos["Filters"].template_filters == [name]


def test_two_plugins_registering_one_filter_name_fail_the_second(
    plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    name = unique("twice")
    source = f"""
        from automator import hookimpl

        @hookimpl
        def register_template_filters(register):
            register({name!r}, str.upper)
        """
    write_plugin("a_filters", source)
    write_plugin("b_filters", source)

    loaded = load_plugins(plugins_dir)

    assert loaded.infos["a_filters"].error is None
    assert loaded.infos["b_filters"].error == f"template filter {name!r} is already registered by plugin 'a_filters'"


def test_globals_from_a_plugin_are_known_to_validate_and_to_runs(automator_runner: WorkflowRunner) -> None:
    company, greet = unique("company"), unique("greet")

    class Globals:
        @hookimpl
        def register_template_globals(self, register: Callable[[str, Any], None]) -> None:
            register(company, {"name": "ACME"})
            register(greet, lambda who: f"hello {who}")

    workflow = f"""
        steps:
          - {{id: src, uses: test.fetch, with: {{items: [{{who: ops}}]}}}}
          - id: t
            uses: template.transform
            with: {{mapping: {{line: "{{{{ {greet}(item.who) }}}} from {{{{ {company}.name }}}}"}}}}
          - {{id: out, uses: test.deliver}}
        """
    with pytest.raises(WorkflowFileError, match=f"unknown name '{greet}' in template"):
        automator_runner.load(workflow)

    result = automator_runner.run(workflow, plugins=[Globals()])

    assert result.delivered["out"] == [{"line": "hello ops from ACME"}]
    assert result.plugins.infos["Globals"].template_globals == sorted([company, greet])


def test_a_global_may_not_shadow_the_run_data(plugins_dir: Path, write_plugin: Callable[[str, str], Path]) -> None:
    write_plugin(
        "shadow",
        """
        from automator import hookimpl

        @hookimpl
        def register_template_globals(register):
            register("item", {})
        """,
    )

    loaded = load_plugins(plugins_dir)

    assert loaded.infos["shadow"].error == "template global 'item' is reserved for the run's own data"
