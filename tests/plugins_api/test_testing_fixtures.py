"""The fixtures automator ships for plugin authors (automator.testing), on their own."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from automator import PluginError, RunFinished, WorkflowFileError, hookimpl
from automator.testing import WorkflowRunner
from tests.plugins_api.conftest import unique
from tests.plugins_api.test_discovery import numbers_plugin


def test_a_given_plugin_that_fails_to_load_raises_with_the_reason(automator_runner: WorkflowRunner) -> None:
    class Misspelt:
        @hookimpl
        def run_finished(self, evnt: object) -> None:
            pass

    with pytest.raises(PluginError, match=r"plugin Misspelt did not load: wrong hook signature run_finished\(evnt\)"):
        automator_runner.run("steps:\n  - {id: a, uses: test.fetch}\n", plugins=[Misspelt()])


def test_load_errors_name_installed_plugins_that_failed(
    automator_runner: WorkflowRunner, install_distribution: Callable[..., str]
) -> None:
    install_distribution("halfbaked", "raise ImportError('missing dependency acme-sdk')\n")

    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load("steps:\n  - {id: a, uses: halfbaked.fetch}\n")

    assert "unknown step type 'halfbaked.fetch'" in str(caught.value)
    assert any(
        note.startswith("plugin halfbaked failed to load: ImportError: missing dependency acme-sdk")
        for note in caught.value.__notes__
    )


def test_entry_points_false_leaves_installed_plugins_out(
    automator_runner: WorkflowRunner, install_distribution: Callable[..., str]
) -> None:
    step = unique("installed") + ".fetch"
    install_distribution("installed", numbers_plugin(step))

    assert step in automator_runner.plugins().step_types
    assert step not in automator_runner.plugins(entry_points=False).step_types


def test_run_record_ledger_and_deliveries(automator_runner: WorkflowRunner) -> None:
    automator_runner.write("data/items.json", [{"id": "a"}, {"id": "b"}, {"id": "a"}])

    result = automator_runner.run(
        """
        params: {suffix: "!"}
        steps:
          - {id: src, uses: file.fetch, with: {path: data/items.json}, key: "{{ item.id }}"}
          - {id: shout, uses: template.transform, with: {mapping: {id: "{{ item.id }}{{ params.suffix }}"}}}
          - {id: first, uses: test.deliver}
          - {id: second, uses: test.deliver, with: {fail_when: "{{ item.id == 'b?' }}"}}
        """,
        params={"suffix": "?"},
    )

    assert result.status == "failed"
    assert result.outcomes == {"delivered": 1, "skipped": 1, "quarantined": 0, "failed": 1}
    assert result.delivered == {"first": [{"id": "a?"}, {"id": "b?"}], "second": [{"id": "a?"}]}
    assert [(i.key, i.outcome) for i in result.items] == [("a", "delivered"), ("b", "failed"), ("a", "skipped")]
    assert [s.step_id for s in result.steps] == ["src", "shout", "first", "second"]
    assert result.step("second").items_out == 1
    [finished] = result.events_of(RunFinished)
    assert finished.counts["fetched"] == 3
    assert result.run.params == {"suffix": "?"}
