"""Noticing that a plugin file changed while the daemon runs, and saying a restart is needed.

Plugins are loaded once, at start. Reloading them in a running daemon is not safe:
template filters and globals live in one Jinja environment shared by every run of the
process (a reload would change them under runs in flight, and could not take a
removed one back), a plugin module re-executed under the same name replaces the one
runs in flight still call, and a workflow's last good version holds step objects of
the old plugins. So the daemon only tells: once per change, a warning that names the
file and asks for a restart.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("automator.daemon")


class PluginWatch:
    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._loaded = self._signatures()  # what the daemon loaded at start
        self._told: dict[Path, tuple[int, int] | None] = {}

    def _signatures(self) -> dict[Path, tuple[int, int]]:
        if self.directory is None or not self.directory.is_dir():
            return {}
        found: dict[Path, tuple[int, int]] = {}
        # the files the plugin loader reads: plain .py files, not starting with "_"
        for path in self.directory.glob("*.py"):
            if path.name.startswith("_"):
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            found[path] = (stat.st_mtime_ns, stat.st_size)
        return found

    def check(self) -> list[Path]:
        """Plugin files added, changed or removed since start that were not reported yet."""
        now = self._signatures()
        changed: list[Path] = []
        for path in sorted(set(now) | set(self._loaded)):
            current = now.get(path)
            if current == self._loaded.get(path):
                self._told.pop(path, None)  # back as it was loaded
                continue
            if path in self._told and self._told[path] == current:
                continue
            self._told[path] = current
            changed.append(path)
            what = "removed" if current is None else ("added" if path not in self._loaded else "changed")
            log.warning(
                "plugin file %s was %s; plugins are loaded at start: restart the daemon to use it",
                path,
                what,
                extra={"file": str(path), "change": what},
            )
        return changed
