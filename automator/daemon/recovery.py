"""Crash recovery in the daemon: orphaned runs found at start and every 30 s, resumed in a run thread.

What counts as orphaned and how a run is taken over (crashed, then resumed or failed per
``on_crash``) is :mod:`automator.engine.recovery`, which ``automator run`` and
``automator resume`` use too; this module turns its decisions into fires.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from automator.daemon.runs import Fire
from automator.engine.recovery import MAX_RESUMES, CrashRecovery, process_alive
from automator.spec.loader import Workflow

__all__ = ["MAX_RESUMES", "Recovery", "process_alive"]

log = logging.getLogger("automator.daemon")


@dataclass
class Recovery:
    crash: CrashRecovery  # with the daemon's owner id and start time
    folder: Path  # the daemon's workflows folder

    def scan(self, mine: set[int], workflows: dict[str, Workflow]) -> list[Fire]:
        """Take over orphaned runs; return the resumes (and failure notices) to start."""
        fires: list[Fire] = []
        for orphan in self.crash.orphans(mine=mine):
            workflow = workflows.get(orphan.run.workflow)
            if workflow is None and not self._from_my_folder(orphan.run.path):
                # another folder's workflow (another daemon's, or an `automator run` of a file
                # elsewhere): only marked crashed; resumed by a process that has the workflow
                self.crash.detect(orphan)
                continue
            decision = self.crash.take_over(orphan, workflow)
            if decision is None:
                continue  # another process got there first
            if decision.resume:
                assert workflow is not None
                fires.append(
                    Fire(workflow=workflow.name, trigger="resume", resume_run_id=decision.run_id, pinned=workflow)
                )
            elif decision.notify:
                assert workflow is not None
                # tell someone, as for any failed run
                fires.append(
                    Fire(workflow=workflow.name, trigger="notify", notify_run_id=decision.run_id, pinned=workflow)
                )
        return fires

    def _from_my_folder(self, path: str | None) -> bool:
        """Whether a run's workflow file was in this daemon's folder (it is gone from it, then)."""
        return path is not None and Path(path).resolve().parent == self.folder.resolve()
