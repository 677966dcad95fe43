"""One broken plugin is reported with its name and reason, skipped, and changes nothing else."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from automator.plugins.manager import load_plugins
from automator.testing import WorkflowRunner
from tests.plugins_api.conftest import unique
from tests.plugins_api.test_discovery import numbers_plugin


def load_one(plugins_dir: Path, write_plugin: Callable[[str, str], Path], source: str, name: str = "suspect"):
    write_plugin(name, source)
    loaded = load_plugins(plugins_dir)
    return loaded, loaded.infos[name]


def test_import_error_of_an_entry_point_is_reported(install_distribution: Callable[..., str]) -> None:
    install_distribution("crashy", "raise ImportError('needs libfoo 2')\n", version="0.9")

    loaded = load_plugins()

    info = loaded.infos["crashy"]
    assert info.source == "entry point"
    assert info.version == "0.9"
    assert info.error is not None and info.error.startswith("ImportError: needs libfoo 2 (")
    assert "http.fetch" in loaded.step_types


def test_syntax_error_in_a_directory_plugin_is_reported_with_its_line(
    plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    loaded, info = load_one(plugins_dir, write_plugin, "x = 1\ndef broken(:\n    pass\n")

    assert info.error == f"SyntaxError: invalid syntax ({plugins_dir / 'suspect.py'}, line 2)"
    assert loaded.failures == [info]


def test_wrong_hook_signature_is_reported_at_load_time_with_the_plugin_name(
    plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    loaded, info = load_one(
        plugins_dir,
        write_plugin,
        """
        from automator import hookimpl

        @hookimpl
        def item_outcome(event):
            raise AssertionError("a plugin that failed to load must never be called")

        @hookimpl
        def run_started(evnt):
            pass
        """,
    )

    assert info.error is not None
    assert info.error.startswith(
        "wrong hook signature run_started(evnt); the hook is run_started(event): unknown argument(s) evnt"
    )
    assert "evnt" in info.error and "\n" not in info.error
    # pluggy had already taken item_outcome when it met the bad run_started: it was undone
    assert not loaded.wants_item_events
    assert "suspect" not in {p for p, _ in loaded.pm.list_name_plugin()}


def test_wrong_signature_fails_the_plugin_but_a_workflow_using_others_runs(
    plugins_dir: Path, write_plugin: Callable[[str, str], Path], automator_runner: WorkflowRunner
) -> None:
    step = unique("good") + ".fetch"
    write_plugin("good", numbers_plugin(step))
    write_plugin("bad", "from automator import hookimpl\n\n@hookimpl\ndef get_secret(key):\n    return 'x'\n")
    loaded = load_plugins(plugins_dir)
    workflow = automator_runner.write("flow.yaml", f"steps:\n  - {{id: n, uses: {step}}}\n")

    assert "wrong hook signature get_secret(key)" in (loaded.infos["bad"].error or "")
    wf = automator_runner.load(workflow, plugins=loaded)
    assert [s.type.name for s in wf.steps] == [step]


def test_unknown_hook_name_is_reported(plugins_dir: Path, write_plugin: Callable[[str, str], Path]) -> None:
    loaded, info = load_one(
        plugins_dir,
        write_plugin,
        """
        from automator import hookimpl

        @hookimpl
        def on_run_started(event):
            pass
        """,
    )

    assert info.error == "implements unknown hook(s) on_run_started; see docs/plugins.md for the hook names"
    assert not loaded.pm.is_registered(loaded.pm.get_plugin("suspect"))


def test_hook_wrappers_are_refused(plugins_dir: Path, write_plugin: Callable[[str, str], Path]) -> None:
    _, info = load_one(
        plugins_dir,
        write_plugin,
        """
        from automator import hookimpl

        @hookimpl(wrapper=True)
        def run_started(event):
            return (yield)
        """,
    )

    assert info.error == "hook wrappers are not supported (run_started); implement the hook plainly"


def test_step_type_registered_twice_fails_the_later_plugin(
    plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    write_plugin("a_first", numbers_plugin("shared.fetch"))
    write_plugin("b_second", numbers_plugin("shared.fetch"))

    loaded = load_plugins(plugins_dir)

    assert loaded.infos["a_first"].error is None
    assert loaded.infos["b_second"].error == "step type 'shared.fetch' is already registered by plugin 'a_first'"
    assert loaded.step_plugin["shared.fetch"] == "a_first"


def test_step_type_clashing_with_a_builtin_is_refused(
    plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    loaded, info = load_one(plugins_dir, write_plugin, numbers_plugin("http.fetch"))

    assert (
        info.error is not None
        and "'http.fetch' is already registered by plugin 'automator_standard.http_fetch'" in (info.error)
    )
    assert loaded.step_plugin["http.fetch"] == "automator_standard.http_fetch"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("register(object)", "<class 'object'> is not a step type"),
        (
            "class NoMethod(TransformStep):\n        name = 'x.transform'\n    register(NoMethod)",
            "step type 'x.transform' does not implement transform()",
        ),
        (
            "class NoName(TransformStep):\n        def transform(self, item): return item\n    register(NoName)",
            "step type NoName has no name",
        ),
    ],
    ids=["not-a-class", "missing-method", "missing-name"],
)
def test_malformed_step_types_are_reported(
    plugins_dir: Path, write_plugin: Callable[[str, str], Path], body: str, expected: str
) -> None:
    source = (
        f"from automator import TransformStep, hookimpl\n\n@hookimpl\ndef register_step_types(register):\n    {body}\n"
    )
    loaded, info = load_one(plugins_dir, write_plugin, source)

    assert info.error is not None and expected in info.error
    assert not loaded.pm.has_plugin("suspect")


def test_a_plugin_that_raises_while_registering_is_reported(
    plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    _, info = load_one(
        plugins_dir,
        write_plugin,
        """
        from automator import hookimpl

        @hookimpl
        def register_step_types(register):
            raise KeyError("config")
        """,
    )

    assert info.error is not None and info.error.startswith("KeyError: 'config' (")


def test_two_plugins_with_one_name_keep_the_first(
    install_distribution: Callable[..., str], plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    install_distribution("twin", numbers_plugin(unique("twin_ep") + ".fetch"))
    write_plugin("twin", numbers_plugin(unique("twin_dir") + ".fetch"))

    loaded = load_plugins(plugins_dir)

    assert loaded.infos["twin"].source == "entry point"
    duplicate = next(info for key, info in loaded.infos.items() if key.startswith("twin ("))
    assert duplicate.error is not None and "already loaded" in duplicate.error
