"""What every command shares: options, opening the history, loading plugins, JSON output."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from automator.history.store import History
from automator.plugins.manager import Plugins, load_plugins

if TYPE_CHECKING:
    from automator.history.protocols import SchedulerStore


@dataclass
class Settings:
    """The group's options, shared with every command through click's context object."""

    database_url: str | None = None
    plugins_dir: Path | None = None
    extra_plugins: tuple[object, ...] = ()  # plugin objects given by automator.testing
    _history: History | None = field(default=None, repr=False)
    _plugins: dict[Path | None, Plugins] = field(default_factory=dict, repr=False)

    def history(self, *, auto_upgrade: bool | None = None, detect_abandoned: bool = True) -> History:
        """The history database, opened once; runs a dead process left ``running`` are marked ``crashed``.

        ``detect_abandoned=False``: the command takes over such runs itself (``run``, ``resume``).
        """
        if self._history is None:
            self._history = History(self.database_url, auto_upgrade=auto_upgrade)
            if detect_abandoned:
                detect_abandoned_runs(self._history)
        return self._history

    def plugins(self, workflows_dir: Path | None = None) -> Plugins:
        """The plugins for workflow files in ``workflows_dir``: the one rule of every command.

        Built-ins, entry points, and the plugins folder: ``--plugins-dir`` if given, else
        ``plugins/`` beside ``workflows_dir``, else none. Loaded once per folder and call.
        """
        directory = self.plugins_dir
        if directory is None and workflows_dir is not None:
            directory = default_plugins_dir(workflows_dir)
        if directory not in self._plugins:
            extra = [(plugin, _plugin_name(plugin)) for plugin in self.extra_plugins]
            self._plugins[directory] = load_plugins(directory, extra=extra)
        return self._plugins[directory]

    def close(self) -> None:
        if self._history is not None:
            self._history.close()


def default_plugins_dir(workflows_dir: Path) -> Path:
    """``plugins/`` beside the folder the workflow files are in."""
    return workflows_dir.resolve().parent / "plugins"


def project_workflows_dir() -> Path | None:
    """``./workflows`` if it exists: the daemon's default folder, and so that of ``plugins`` and ``schema``."""
    folder = Path("workflows")
    return folder if folder.is_dir() else None


def _plugin_name(plugin: object) -> str:
    return getattr(plugin, "__name__", None) or type(plugin).__name__


def warn_skipped_plugins(*loaded: Plugins) -> None:
    """Say once, on stderr, which plugins failed to load and were skipped."""
    seen: set[tuple[str, str | None]] = set()
    for plugins in loaded:
        for failure in plugins.failures:
            if (failure.name, failure.error) not in seen:
                seen.add((failure.name, failure.error))
                stderr.print(f"warning: plugin {failure.name} was skipped: {failure.error}", markup=False)


def settings(ctx: click.Context) -> Settings:
    return ctx.ensure_object(Settings)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


# piped output is read by people too (`automator runs | less`): give tables room instead of 80 columns
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def is_terminal() -> bool:
    return sys.stdout.isatty()


def detect_abandoned_runs(history: History) -> None:
    """Mark ``crashed`` the runs left ``running`` by a process that is gone, so that none shows as running.

    Only marked (crash recovery records it as detected): resuming or failing such a run
    per its ``on_crash`` needs its workflow, and is done by the next ``automator run`` of
    that workflow, by ``automator resume ID``, or by the daemon. Runs of a live process
    are left alone.
    """
    from automator.engine.recovery import CrashRecovery
    from automator.errors import HistoryError
    from automator.history.daemon_store import DaemonStore
    from automator.history.states import RunStatus

    store: SchedulerStore = DaemonStore(history)
    recovery = CrashRecovery(history, store)
    try:
        for orphan in recovery.orphans():
            if orphan.run.status == RunStatus.RUNNING and recovery.detect(orphan):
                logging.getLogger("automator.cli").warning(
                    "run %s of %s is now crashed; the next `automator run` of it (or `automator resume %s`) "
                    "resumes it, or fails it per on_crash",
                    orphan.run.id,
                    orphan.run.workflow,
                    orphan.run.id,
                )
    except HistoryError as exc:
        # the command itself may still work (reading a read-only history, say)
        logging.getLogger("automator.cli").warning("could not check for abandoned runs: %s", exc.message)
