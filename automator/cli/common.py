"""What every command shares: options, opening the history, loading plugins, JSON output."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from automator.history.store import History
from automator.plugins.manager import Plugins, load_plugins


@dataclass
class Settings:
    """The group's options, shared with every command through click's context object."""

    database_url: str | None = None
    plugins_dir: Path | None = None
    _history: History | None = field(default=None, repr=False)
    _plugins: dict[Path | None, Plugins] = field(default_factory=dict, repr=False)

    def history(self, *, auto_upgrade: bool | None = None) -> History:
        if self._history is None:
            self._history = History(self.database_url, auto_upgrade=auto_upgrade)
        return self._history

    def plugins(self, workflows_dir: Path | None = None) -> Plugins:
        """Plugins: built-ins, entry points, and --plugins-dir or ``plugins/`` beside the workflows' folder."""
        directory = self.plugins_dir
        if directory is None and workflows_dir is not None:
            directory = default_plugins_dir(workflows_dir)
        if directory not in self._plugins:
            self._plugins[directory] = load_plugins(directory)
        return self._plugins[directory]

    def close(self) -> None:
        if self._history is not None:
            self._history.close()


def default_plugins_dir(workflows_dir: Path) -> Path:
    """``plugins/`` beside the folder the workflow files are in."""
    return workflows_dir.resolve().parent / "plugins"


def settings(ctx: click.Context) -> Settings:
    return ctx.ensure_object(Settings)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


# piped output is read by people too (`automator runs | less`): give tables room instead of 80 columns
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def is_terminal() -> bool:
    return sys.stdout.isatty()
