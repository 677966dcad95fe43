"""Templates belong to one set of loaded plugins: their filters and globals, and no others."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from automator import WorkflowFileError, hookimpl, load_workflow
from automator.plugins.manager import load_plugins
from automator.testing import WorkflowRunner

SHOUT_PLUGIN = """
    from automator import hookimpl

    @hookimpl
    def register_template_filters(register):
        register("shout", lambda text: str(text).upper() + "!")
    """


def test_a_filter_is_unknown_to_plugins_loaded_without_its_plugin(
    tmp_path: Path, plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    write_plugin("shout_filters", SHOUT_PLUGIN)
    flow = tmp_path / "flow.yaml"
    flow.write_text(
        textwrap.dedent(
            """\
            steps:
              - {id: src, uses: file.fetch, with: {path: items.jsonl}}
              - id: t
                uses: template.transform
                with: {template: "{{ item.title | shout }}"}
            """
        ),
        encoding="utf-8",
    )
    assert load_workflow(flow, load_plugins(plugins_dir)).steps[1].id == "t"

    with pytest.raises(WorkflowFileError) as raised:
        load_workflow(flow, load_plugins(None))  # a later load, without the plugin

    [problem] = raised.value.problems
    assert (problem.line, problem.column) == (5, 22)
    assert "unknown filter 'shout'" in problem.message


def test_two_plugin_sets_each_render_with_their_own_filter(automator_runner: WorkflowRunner) -> None:
    def filters(function: Callable[[str], str]) -> object:
        class Label:
            @hookimpl
            def register_template_filters(self, register: Callable[[str, Callable[..., Any]], None]) -> None:
                register("label", function)

        return Label()

    workflow = """
        steps:
          - {id: src, uses: test.fetch, with: {items: [{w: Mixed}]}}
          - {id: t, uses: template.transform, with: {mapping: {r: "{{ item.w | label }}"}}}
          - {id: out, uses: test.deliver}
        """
    loud = automator_runner.plugins([filters(str.upper)])
    quiet = automator_runner.plugins([filters(str.lower)])
    loud_flow, quiet_flow = (
        automator_runner.load(workflow, plugins=loud),
        automator_runner.load(workflow, plugins=quiet),
    )

    assert loud.templates.render_value(loud_flow.steps[1].config.mapping, {"item": {"w": "Mixed"}}) == {"r": "MIXED"}
    assert quiet.templates.render_value(quiet_flow.steps[1].config.mapping, {"item": {"w": "Mixed"}}) == {"r": "mixed"}
    assert automator_runner.run(workflow, plugins=[filters(str.upper)]).delivered["out"] == [{"r": "MIXED"}]
    assert automator_runner.run(workflow, plugins=[filters(str.lower)]).delivered["out"] == [{"r": "mixed"}]


def test_a_global_is_unknown_to_plugins_loaded_without_its_plugin(automator_runner: WorkflowRunner) -> None:
    class Company:
        @hookimpl
        def register_template_globals(self, register: Callable[[str, Any], None]) -> None:
            register("company", {"name": "ACME"})

    workflow = """
        steps:
          - {id: src, uses: test.fetch, with: {items: [{}]}}
          - {id: t, uses: template.transform, with: {mapping: {c: "{{ company.name }}"}}}
          - {id: out, uses: test.deliver}
        """
    assert automator_runner.run(workflow, plugins=[Company()]).delivered["out"] == [{"c": "ACME"}]

    with pytest.raises(WorkflowFileError, match="unknown name 'company' in template"):
        automator_runner.load(workflow)


def test_a_plugin_global_function_is_callable_but_never_shown_as_text(automator_runner: WorkflowRunner) -> None:
    class Greeter:
        @hookimpl
        def register_template_globals(self, register: Callable[[str, Any], None]) -> None:
            register("greet", lambda who: f"hello {who}")

    result = automator_runner.run(
        """
        steps:
          - {id: src, uses: test.fetch, with: {items: [{who: ops, n: 1}, {who: dev, n: 2}]}}
          - id: t
            uses: template.transform
            with: {template: "{{ greet(item.who) if item.n == 1 else greet }}"}
          - {id: out, uses: test.deliver}
        """,
        plugins=[Greeter()],
    )

    assert result.delivered["out"] == [{"text": "hello ops"}]
    failed = [i for i in result.items if i.outcome == "failed"]
    assert [i.reason for i in failed] == [
        "template '{{ greet(item.who) if item.n == 1 else greet }}': "
        "greet is not data and cannot be shown as text (call it, or pick one of its fields)"
    ]


def test_a_macro_defined_in_a_template_is_a_known_name(automator_runner: WorkflowRunner) -> None:
    result = automator_runner.run(
        """
        steps:
          - {id: src, uses: test.fetch, with: {items: [{w: a}]}}
          - id: t
            uses: template.transform
            with: {template: "{% macro twice(x) %}{{ x }}{{ x }}{% endmacro %}{{ twice(item.w) }}"}
          - {id: out, uses: test.deliver}
        """
    )

    assert result.delivered["out"] == [{"text": "aa"}]
