"""The folder of workflow files: what is scheduled, kept current while the daemon runs.

Polling (a ``stat`` of each file every second) rather than inotify: it works the same on
network mounts, container bind mounts and ConfigMap volumes (which swap a symlink), where
change notifications are often not delivered. An edit that breaks a file keeps its last
good version in place; the problems are logged with ``FILE:LINE:COL``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from automator.errors import Problem, WorkflowFileError
from automator.plugins.manager import Plugins
from automator.spec.loader import WORKFLOW_SUFFIXES, Workflow, load_workflow_text, read_workflow_text

log = logging.getLogger("automator.daemon")


@dataclass
class Changes:
    """What a scan found: workflows new or changed (by name), names gone, files now broken."""

    updated: list[Workflow] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    broken: dict[Path, list[Problem]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.updated or self.removed or self.broken)


class WorkflowFolder:
    def __init__(self, directory: Path, plugins: Plugins) -> None:
        self.directory = directory
        self.plugins = plugins
        self._seen: dict[Path, tuple[int, int]] = {}  # (mtime, size) last looked at
        self._digest: dict[Path, str] = {}  # content hash last loaded (good or bad)
        self._good: dict[Path, Workflow] = {}  # the last good version of each file
        self.broken: dict[Path, list[Problem]] = {}  # files whose current text is invalid
        self.workflows: dict[str, Workflow] = {}  # by name: what the daemon schedules

    def files(self) -> list[Path]:
        try:
            entries = sorted(self.directory.iterdir())
        except OSError as exc:
            log.error("cannot list the workflows folder %s: %s", self.directory, exc.strerror)
            return []
        # editors' swap and backup files start with a dot or end with ~
        return [p for p in entries if p.suffix in WORKFLOW_SUFFIXES and not p.name.startswith(".") and p.is_file()]

    def scan(self) -> Changes:
        changes = Changes()
        present = self.files()
        for path in present:
            try:
                stat = path.stat()
            except OSError:
                continue  # removed meanwhile: the next scan sees it gone
            signature = (stat.st_mtime_ns, stat.st_size)
            if self._seen.get(path) == signature:
                continue
            self._seen[path] = signature
            try:
                text = read_workflow_text(path)
            except WorkflowFileError as exc:
                self._fail(path, exc.problems, changes)
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            if self._digest.get(path) == digest:
                continue  # touched, not changed
            self._digest[path] = digest
            self._load(path, text, changes)
        for path in set(self._seen) - set(present):
            for table in (self._seen, self._digest, self._good, self.broken):
                table.pop(path, None)
            log.info("workflow file removed: %s", path, extra={"file": str(path)})
        self._rebuild(changes)
        return changes

    def _load(self, path: Path, text: str, changes: Changes) -> None:
        try:
            workflow = load_workflow_text(text, path, self.plugins)
        except WorkflowFileError as exc:
            self._fail(path, exc.problems, changes)
            return
        except Exception as exc:
            # a bug, in a plugin's hook or in our loader: one file must only ever cost that file,
            # never the scan of the others (nor the daemon's housekeeping); the traceback is logged
            log.exception("loading workflow file %s failed unexpectedly", path, extra={"file": str(path)})
            problem = Problem(str(path), 1, 1, f"cannot load the file: {type(exc).__name__}: {exc}")
            self._fail(path, [problem], changes)
            return
        for other_path, other in self._good.items():
            if other_path != path and other.name == workflow.name:
                problem = Problem(str(path), 1, 1, f"workflow name {workflow.name!r} is already used by {other_path}")
                self._fail(path, [problem], changes)
                return
        self._good[path] = workflow
        if self.broken.pop(path, None) is not None:
            log.info("workflow file %s is valid again", path, extra={"file": str(path)})

    def _fail(self, path: Path, problems: list[Problem], changes: Changes) -> None:
        self.broken[path] = problems
        changes.broken[path] = problems
        kept = self._good.get(path)
        keeping = f"; keeping the last good version ({kept.version})" if kept else "; not scheduled"
        log.error(
            "invalid workflow file %s%s:\n%s",
            path,
            keeping,
            "\n".join(str(p) for p in problems),
            extra={"file": str(path), "problems": [str(p) for p in problems]},
        )

    def _rebuild(self, changes: Changes) -> None:
        current = {wf.name: wf for wf in self._good.values()}
        for name, workflow in current.items():
            if self.workflows.get(name) is not workflow:
                changes.updated.append(workflow)
        changes.removed.extend(name for name in self.workflows if name not in current)
        self.workflows = current
