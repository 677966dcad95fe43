"""Finding plugins: built-ins, entry points, a plugins directory; choosing them with variables."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from automator.plugins.manager import BUILTIN_PLUGINS, Plugins, load_plugins
from automator.testing import WorkflowRunner
from tests.plugins_api.conftest import unique


def numbers_plugin(step_name: str, version: str | None = None) -> str:
    """Source of a small, correct plugin: a fetch step producing ``count`` numbers."""
    return f"""
        from automator import FetchStep, StepConfig, hookimpl

        __version__ = {version!r}

        class NumbersConfig(StepConfig):
            count: int = 2

        class Numbers(FetchStep[NumbersConfig]):
            name = {step_name!r}

            def fetch(self):
                return [{{"n": i}} for i in range(self.config.count)]

        @hookimpl
        def register_step_types(register):
            register(Numbers)
        """


def test_builtins_are_ordinary_plugins(plugins: Plugins) -> None:
    builtin = [info for info in plugins.infos.values() if info.source == "built-in"]

    assert [info.name for info in builtin] == list(BUILTIN_PLUGINS)
    assert all(info.steps and info.version and not info.error for info in builtin)
    assert plugins.step_plugin["http.fetch"] == "automator_standard.http_fetch"


def test_entry_point_plugin_is_found_with_its_distribution_version(install_distribution: Callable[..., str]) -> None:
    step = unique("acme") + ".fetch"
    install_distribution("acme", numbers_plugin(step), dist="acme-automator", version="2.5.1")

    loaded = load_plugins()

    info = loaded.infos["acme"]
    assert (info.source, info.version, info.error) == ("entry point", "2.5.1", None)
    assert [s.name for s in info.steps] == [step]
    assert info.hooks == ["register_step_types"]
    assert loaded.step_plugin[step] == "acme"


def test_entry_point_plugin_runs_a_workflow(
    install_distribution: Callable[..., str], automator_runner: WorkflowRunner
) -> None:
    step = unique("acme") + ".fetch"
    install_distribution("acme", numbers_plugin(step))

    result = automator_runner.run(
        f"""
        steps:
          - {{id: numbers, uses: {step}, with: {{count: 3}}}}
          - {{id: out, uses: test.deliver}}
        """
    )

    assert result.delivered["out"] == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_directory_plugin_is_found_with_its_version(
    plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    step = unique("local") + ".fetch"
    path = write_plugin("local_numbers", numbers_plugin(step, version="0.3"))
    write_plugin("_helpers", "raise RuntimeError('files starting with _ are not plugins')")

    loaded = load_plugins(plugins_dir)

    info = loaded.infos["local_numbers"]
    assert (info.source, info.version, info.location, info.error) == ("directory", "0.3", str(path), None)
    assert step in loaded.step_types
    assert "_helpers" not in loaded.infos


def test_automator_plugins_loads_only_the_named_ones(
    plugins_dir: Path, write_plugin: Callable[[str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_plugin("wanted", numbers_plugin(unique("wanted") + ".fetch"))
    write_plugin("unwanted", numbers_plugin(unique("unwanted") + ".fetch"))
    monkeypatch.setenv("AUTOMATOR_PLUGINS", "wanted, automator_standard.file_fetch")

    loaded = load_plugins(plugins_dir)

    assert sorted(loaded.infos) == ["automator_standard.file_fetch", "wanted"]
    assert "file.fetch" in loaded.step_types
    assert "http.fetch" not in loaded.step_types


def test_automator_disable_plugins_skips_the_named_ones(
    install_distribution: Callable[..., str],
    plugins_dir: Path,
    write_plugin: Callable[[str, str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install_distribution("noisy", numbers_plugin(unique("noisy") + ".fetch"))
    write_plugin("local_one", numbers_plugin(unique("local") + ".fetch"))
    monkeypatch.setenv("AUTOMATOR_DISABLE_PLUGINS", "noisy,automator_standard.webhook_deliver")

    loaded = load_plugins(plugins_dir)

    assert "noisy" not in loaded.infos
    assert "automator_standard.webhook_deliver" not in loaded.infos
    assert "webhook.deliver" not in loaded.step_types
    assert "local_one" in loaded.infos and "http.fetch" in loaded.step_types


def test_plugins_json_lists_source_version_hooks_steps_and_failures(
    cli: Callable[..., object],
    install_distribution: Callable[..., str],
    plugins_dir: Path,
    write_plugin: Callable[[str, str], Path],
) -> None:
    step = unique("acme") + ".fetch"
    install_distribution("acme", numbers_plugin(step), version="1.4.0")
    write_plugin(
        "listener",
        """
        from automator import hookimpl

        @hookimpl
        def run_finished(event):
            pass
        """,
    )
    write_plugin("broken", "import no_such_module_here\n")

    result = cli("--plugins-dir", plugins_dir, "plugins", "--json")

    assert result.exit_code == 0, result.stderr
    by_name = {entry["name"]: entry for entry in result.json()}
    assert by_name["acme"] == {
        "name": "acme",
        "version": "1.4.0",
        "source": "entry point",
        "location": by_name["acme"]["location"],
        "hooks": ["register_step_types"],
        "steps": [{"name": step, "phase": "fetch", "description": ""}],
        "template_filters": [],
        "template_globals": [],
    }
    assert by_name["listener"]["source"] == "directory"
    assert by_name["listener"]["hooks"] == ["run_finished"]
    assert "error" not in by_name["listener"]
    assert by_name["broken"]["error"].startswith("ModuleNotFoundError: No module named 'no_such_module_here'")
    assert by_name["automator_standard.http_fetch"]["source"] == "built-in"
    assert all({"name", "version", "source", "hooks", "steps"} <= set(entry) for entry in by_name.values())


def test_plugins_table_shows_failed_plugins(
    cli: Callable[..., object], plugins_dir: Path, write_plugin: Callable[[str, str], Path]
) -> None:
    write_plugin("broken", "def oops(:\n")

    result = cli("--plugins-dir", plugins_dir, "plugins")

    assert result.exit_code == 0, result.stderr
    assert "file.fetch" in result.stdout
    assert "failed broken (directory" in result.stdout
    assert "SyntaxError" in result.stdout
