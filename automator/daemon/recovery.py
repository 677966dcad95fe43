"""Crash recovery: a run still ``running`` whose owner is gone is marked ``crashed``.

Then, per the workflow's ``on_crash``, it is resumed in the same run id (its pending
items go through the steps after the fetch again) or ended: its pending items fail.

Whether the owner is gone: an owner on this host is a process id, checked directly
(a process that started after the run is a different one that reuses the id, as
every container's PID 1 does); an owner on another host is gone when the run's
heartbeat is older than ``stale_after``.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psutil

from automator.daemon.runs import Fire
from automator.daemon.store import DaemonStore, RunningRun
from automator.spec.loader import Workflow

log = logging.getLogger("automator.daemon")

# a run that crashed this often while resuming is failed: the crash is probably the run's own
MAX_RESUMES = 3


@dataclass
class Recovery:
    store: DaemonStore
    me: str  # this daemon's owner id (host:pid)
    process_started: datetime
    stale_after: timedelta

    def owner_gone(self, run: RunningRun, mine: set[int]) -> str | None:
        """Why the run's owner is gone, or None if it may still be running."""
        owner = run.owner or ""
        host, _, pid_text = owner.rpartition(":")
        if owner == self.me:
            if run.id in mine or run.started_at >= self.process_started:
                return None
            return f"its daemon ({owner}) stopped without finishing it"
        if host == socket.gethostname() and pid_text.isdigit():
            if process_alive(int(pid_text), run.started_at):
                return None
            return f"its process ({owner}) is gone"
        beat = run.heartbeat_at or run.started_at
        if datetime.now(UTC) - beat > self.stale_after:
            return f"no heartbeat from its owner ({owner or 'unknown'}) since {beat.isoformat(timespec='seconds')}"
        return None

    def scan(self, mine: set[int], workflows: dict[str, Workflow]) -> list[Fire]:
        """Mark orphaned runs crashed; end or claim each; return the resumes to start."""
        resumes: list[Fire] = []
        for run in self.store.running_runs():
            reason = self.owner_gone(run, mine)
            if reason is None or not self.store.mark_crashed(run, detected_by=self.me, reason=reason):
                continue
            log.warning(
                "run %s of %s crashed: %s",
                run.id,
                run.workflow,
                reason,
                extra={"run_id": run.id, "workflow": run.workflow},
            )
            fire = self._decide(run, reason, workflows.get(run.workflow))
            if fire is not None:
                resumes.append(fire)
        return resumes

    def _decide(self, run: RunningRun, reason: str, workflow: Workflow | None) -> Fire | None:
        why_not: str | None = None
        if workflow is None:
            why_not = "the workflow is not in this daemon's folder"
        elif workflow.spec.on_crash == "fail":
            why_not = "on_crash is fail"
        elif workflow.version != run.version:
            why_not = f"the workflow file changed since it started (version {run.version} -> {workflow.version})"
        elif sum(1 for action, _ in self.store.recoveries(run.id) if action == "resumed") >= MAX_RESUMES:
            why_not = f"it crashed {MAX_RESUMES} times while resuming"
        if why_not is not None:
            message = f"the run crashed ({reason}); not resumed: {why_not}"
            self.store.end_run(run.id, status="crashed", reason=message, by=self.me)
            log.warning("run %s of %s failed: %s", run.id, run.workflow, message, extra={"run_id": run.id})
            if workflow is not None and workflow.on_failure:
                # tell someone, as for any failed run
                return Fire(workflow=run.workflow, trigger="notify", notify_run_id=run.id, pinned=workflow)
            return None
        assert workflow is not None
        if not self.store.claim_for_resume(run.id, self.me):
            return None  # another daemon resumed it
        log.warning("resuming run %s of %s", run.id, run.workflow, extra={"run_id": run.id, "workflow": run.workflow})
        return Fire(workflow=run.workflow, trigger="resume", resume_run_id=run.id, pinned=workflow)


def process_alive(pid: int, run_started: datetime) -> bool:
    """Whether the process that started a run at ``run_started`` still runs (not a reused pid)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = datetime.fromtimestamp(process.create_time(), UTC)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # someone else's process: it exists, and we cannot tell more
    # a process younger than the run cannot be the one that started it (the id was reused)
    return created <= run_started + timedelta(seconds=1)
