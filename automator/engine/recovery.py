"""Crash recovery, the same for the daemon and the command line.

A run is *unfinished* when it is ``running`` or ``crashed`` and neither resumed nor
failed yet. Such a run is *orphaned* when its owner (``host:pid``) is gone: a process on
this host that no longer exists (or a younger one that reuses its id, as every
container's PID 1 does), or an owner on another host whose heartbeat is older than
``stale_after``. A run whose owner is alive is left alone: a daemon or another
``automator run`` may be running it.

An orphaned run is marked ``crashed`` (recorded as ``detected``), taken over by one
process (atomically, so two never decide about the same run), and then, per the
workflow's ``on_crash``, resumed in the same run id or ended: its pending items fail
(recorded as ``failed``). The daemon (:mod:`automator.daemon.recovery`), ``automator run``
and ``automator resume`` all go through :class:`CrashRecovery`.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psutil

from automator.history.protocols import RunStore, SchedulerStore
from automator.history.states import RunStatus
from automator.history.store import UnfinishedRun
from automator.spec.loader import Workflow

log = logging.getLogger("automator.recovery")

# an owner on another host is gone when it has not stamped its run for this long
STALE_AFTER = timedelta(minutes=2)
# a run that crashed this often while resuming is failed: the crash is probably the run's own
MAX_RESUMES = 3


@dataclass(frozen=True)
class Orphan:
    """An unfinished run whose owner is gone, and how we know."""

    run: UnfinishedRun
    reason: str  # "left running by a process that is gone (pid 4242 on host x)"


@dataclass(frozen=True)
class Decision:
    """What recovery made of an orphan this process took over."""

    run_id: int
    resume: bool  # True: claimed (``running`` under this process): the caller resumes it
    message: str  # the run's error when it was ended instead
    notify: bool = False  # ended, and the workflow has on_failure steps to tell someone


@dataclass
class CrashRecovery:
    history: RunStore
    store: SchedulerStore
    me: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")  # this process's owner id
    process_started: datetime = field(default_factory=lambda: datetime.now(UTC))
    stale_after: timedelta = STALE_AFTER

    def owner_gone(self, run: UnfinishedRun, mine: set[int] | frozenset[int] = frozenset()) -> str | None:
        """Why the run's owner is gone, or None if it may still be running it.

        ``mine``: the runs this process is executing (a resumed run's owner is this
        process although the run started before it).
        """
        reason = self._owner_gone(run, mine)
        if reason is not None and run.status == RunStatus.CRASHED and run.error:
            return run.error  # found crashed before: that finding says best what happened
        return reason

    def _owner_gone(self, run: UnfinishedRun, mine: set[int] | frozenset[int]) -> str | None:
        owner = run.owner or ""
        host, _, pid_text = owner.rpartition(":")
        who = f"pid {pid_text} on host {host}" if host and pid_text else f"owner {owner or 'unknown'}"
        left = "left running" if run.status == RunStatus.RUNNING else "taken over for recovery"
        if owner == self.me:
            if run.id in mine or (run.heartbeat_at or run.started_at) >= self.process_started:
                return None
            return f"{left} by an earlier process with this one's id ({who})"
        if host == socket.gethostname() and pid_text.isdigit():
            # the owner stamped the run when it started or took it: a process younger than
            # that stamp is another one that reuses the id
            if process_alive(int(pid_text), run.heartbeat_at or run.started_at):
                return None
            return f"{left} by a process that is gone ({who})"
        beat = run.heartbeat_at or run.started_at
        if datetime.now(UTC) - beat > self.stale_after:
            since = beat.isoformat(timespec="seconds")
            return f"{left} by a process that sent no heartbeat since {since} ({who})"
        return None

    def orphans(self, workflow: str | None = None, mine: set[int] | frozenset[int] = frozenset()) -> list[Orphan]:
        """The unfinished runs (of ``workflow``, or all) whose owner is gone, oldest first."""
        found = []
        for run in self.history.unfinished_runs(workflow):
            reason = self.owner_gone(run, mine)
            if reason is not None:
                found.append(Orphan(run, reason))
        return found

    def detect(self, orphan: Orphan) -> bool:
        """Mark a ``running`` orphan ``crashed`` (recorded); False if someone got there first."""
        run = orphan.run
        if run.status != RunStatus.RUNNING:
            return True
        if not self.store.mark_crashed(run.id, run.owner, detected_by=self.me, reason=orphan.reason):
            return False
        log.warning(
            "run %s of %s crashed: %s",
            run.id,
            run.workflow,
            orphan.reason,
            extra={"run_id": run.id, "workflow": run.workflow},
        )
        return True

    def why_not_resumed(self, run: UnfinishedRun, workflow: Workflow | None, *, asked: bool = False) -> str | None:
        """Why the run may not be resumed, or None. ``asked``: by ``automator resume`` (on_crash aside)."""
        if workflow is None:
            return "the workflow is not in this daemon's folder"  # only a daemon lacks it
        if not asked and workflow.spec.on_crash == "fail":
            return "on_crash is fail"
        if workflow.version != run.version:
            return f"the workflow file changed since it started (version {run.version} -> {workflow.version})"
        resumes = sum(1 for action, _ in self.store.recoveries(run.id) if action == "resumed")
        if not asked and resumes >= MAX_RESUMES:
            return f"it crashed {MAX_RESUMES} times while resuming"
        return None

    def take_over(self, orphan: Orphan, workflow: Workflow | None, *, asked: bool = False) -> Decision | None:
        """Detect, take, then resume (claim) or end the orphan; None if another process got it first.

        ``asked``: ``automator resume`` asked for it, so on_crash: fail and the resume limit
        do not stand in the way (the caller has checked :meth:`why_not_resumed` first).
        """
        run = orphan.run
        if not self.detect(orphan):
            return None
        if not self.history.take_crashed_run(run.id, previous_owner=run.owner, owner=self.me):
            return None
        # calls sent but never answered in the dead process: the provider may have billed them
        self.history.model_calls.confirm_lost(run.id)
        why_not = self.why_not_resumed(run, workflow, asked=asked)
        if why_not is not None:
            message = f"the run crashed ({orphan.reason}); not resumed: {why_not}"
            self.store.end_run(run.id, status=RunStatus.CRASHED, reason=message, by=self.me)
            log.warning("run %s of %s failed: %s", run.id, run.workflow, message, extra={"run_id": run.id})
            return Decision(run.id, resume=False, message=message, notify=bool(workflow and workflow.on_failure))
        if not self.store.claim_for_resume(run.id, self.me):
            return None  # not reachable while this process owns it; said for safety's sake
        log.warning("resuming run %s of %s", run.id, run.workflow, extra={"run_id": run.id, "workflow": run.workflow})
        return Decision(run.id, resume=True, message=orphan.reason)


def process_alive(pid: int, since: datetime) -> bool:
    """Whether the process that stamped a run at ``since`` still runs (not a reused pid)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = datetime.fromtimestamp(process.create_time(), UTC)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # someone else's process: it exists, and we cannot tell more
    # a process younger than the stamp cannot be the one that wrote it (the id was reused)
    return created <= since + timedelta(seconds=1)
