"""Fires become runs: per-workflow ``max_active_runs`` with ``on_overlap``, a global limit.

A fire that cannot start waits in one FIFO queue (fair across workflows), or — for a
scheduled fire of a workflow with ``on_overlap: skip`` that is already at its limit —
is recorded as a ``skipped`` run. Everything here runs on the daemon's event loop;
run threads report back through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from datetime import UTC, datetime

from automator.daemon.metrics import Metrics
from automator.daemon.runs import Fire, RunThread
from automator.engine.runner import owner_id
from automator.history.protocols import SchedulerStore
from automator.history.states import RequestStatus, RunStatus
from automator.history.store import History
from automator.plugins.manager import Plugins
from automator.redaction import process_redactor
from automator.spec.loader import Workflow

log = logging.getLogger("automator.daemon")

# scheduled fires a workflow may have waiting; more are recorded as skipped, so a
# one-second schedule behind a slow run cannot grow the queue without end
QUEUE_LIMIT = 10


class Dispatcher:
    def __init__(
        self,
        *,
        history: History,
        store: SchedulerStore,
        plugins: Plugins,
        metrics: Metrics,
        workflows: Callable[[], dict[str, Workflow]],
        max_concurrent_runs: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.history = history
        self.store = store
        self.plugins = plugins
        self.metrics = metrics
        self.workflows = workflows
        self.max_concurrent_runs = max_concurrent_runs
        self.loop = loop
        self.active: dict[str, list[RunThread]] = defaultdict(list)
        self.waiting: deque[Fire] = deque()
        self.accepting = True
        self.fired: dict[str, datetime] = {}  # last scheduled fire per workflow, not yet saved
        self.reserved: set[int] = set()  # crashed runs claimed for resume, not started yet

    # -- views ------------------------------------------------------------------------

    @property
    def running(self) -> list[RunThread]:
        return [handle for handles in self.active.values() for handle in handles]

    def my_run_ids(self) -> set[int]:
        return {h.run_id for h in self.running if h.run_id is not None} | self.reserved

    def _waiting_for(self, name: str) -> int:
        return sum(1 for fire in self.waiting if fire.workflow == name)

    def _has_slot(self, workflow: Workflow) -> bool:
        return (
            len(self.running) < self.max_concurrent_runs
            and len(self.active[workflow.name]) < workflow.spec.max_active_runs
        )

    # -- fires ------------------------------------------------------------------------

    def fire(self, fire: Fire) -> None:
        workflow = fire.pinned or self.workflows().get(fire.workflow)
        if fire.resume_run_id is not None:
            self.reserved.add(fire.resume_run_id)
        if not self.accepting or workflow is None:
            log.warning(
                "fire of %s dropped: %s", fire.workflow, "stopping" if not self.accepting else "no such workflow"
            )
            return
        self.metrics.fires.labels(workflow.name, fire.trigger).inc()
        if fire.trigger in ("schedule", "catch_up") and fire.scheduled_for is not None:
            previous = self.fired.get(workflow.name)
            self.fired[workflow.name] = max(previous, fire.scheduled_for) if previous else fire.scheduled_for
        if self._has_slot(workflow) and self._waiting_for(workflow.name) == 0:
            self._start(fire, workflow)
            return
        at_limit = len(self.active[workflow.name]) >= workflow.spec.max_active_runs
        if fire.may_skip and workflow.spec.on_overlap == "skip" and at_limit:
            self._skip(fire, workflow, f"{len(self.active[workflow.name])} run(s) active (max_active_runs)", "overlap")
        elif fire.may_skip and self._waiting_for(workflow.name) >= QUEUE_LIMIT:
            self._skip(fire, workflow, f"{QUEUE_LIMIT} fires already waiting", "queue_full")
        else:
            self.waiting.append(fire)
            self.metrics.queued.set(len(self.waiting))
            log.info(
                "fire of %s queued (%d waiting)",
                workflow.name,
                len(self.waiting),
                extra={"workflow": workflow.name, "trigger": fire.trigger},
            )

    def _skip(self, fire: Fire, workflow: Workflow, reason: str, label: str) -> None:
        run_id = self.store.record_skipped(
            workflow=workflow.name,
            version=workflow.version,
            path=str(workflow.path),
            trigger=fire.trigger,
            scheduled_for=fire.scheduled_for,
            reason=f"skipped: {reason}",
            owner=owner_id(),
        )
        self.metrics.skipped.labels(workflow.name, label).inc()
        log.warning(
            "fire of %s skipped: %s (run %s)",
            workflow.name,
            reason,
            run_id,
            extra={"workflow": workflow.name, "run_id": run_id, "scheduled_for": fire.scheduled_for},
        )

    def pump(self) -> None:
        """Start waiting fires that have a free slot now, oldest first."""
        if not self.accepting:
            return
        for fire in list(self.waiting):
            if len(self.running) >= self.max_concurrent_runs:
                break
            workflow = fire.pinned or self.workflows().get(fire.workflow)
            if workflow is None:
                self.waiting.remove(fire)
                log.warning("queued fire of %s dropped: the workflow was removed", fire.workflow)
                continue
            if self._has_slot(workflow):
                self.waiting.remove(fire)
                self._start(fire, workflow)
        self.metrics.queued.set(len(self.waiting))

    # -- runs -------------------------------------------------------------------------

    def _start(self, fire: Fire, workflow: Workflow) -> None:
        handle = RunThread(fire, workflow, self.history, self.plugins, self._done_threadsafe)
        self.active[workflow.name].append(handle)
        self.metrics.active.labels(workflow.name).set(len(self.active[workflow.name]))
        if fire.trigger == "schedule" and fire.scheduled_for is not None:
            lag = (datetime.now(UTC) - fire.scheduled_for).total_seconds()
            self.metrics.lag.labels(workflow.name).observe(max(lag, 0.0))
        handle.start()

    def _done_threadsafe(self, handle: RunThread) -> None:
        # a closed loop means the daemon is exiting; it looks at the threads itself
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._done, handle)

    def _done(self, handle: RunThread) -> None:
        name = handle.workflow.name
        if handle in self.active[name]:
            self.active[name].remove(handle)
        self.metrics.active.labels(name).set(len(self.active[name]))
        if handle.fire.resume_run_id is not None:
            self.reserved.discard(handle.fire.resume_run_id)
        elapsed = time.monotonic() - handle.started
        extra = {"workflow": name, "run_id": handle.run_id, "trigger": handle.fire.trigger}
        if handle.result is not None:
            result = handle.result
            level = logging.INFO if result.succeeded else logging.WARNING
            log.log(
                level,
                "run %s of %s %s in %.2fs %s%s",
                result.run_id,
                name,
                result.status,
                elapsed,
                " ".join(f"{k}={v}" for k, v in result.counts.items()),
                f": {result.error}" if result.error else "",
                extra={**extra, "status": result.status, "counts": result.counts, "error": result.error},
            )
        elif handle.cancelled:
            log.warning(
                "run %s of %s interrupted", handle.run_id, name, extra={**extra, "status": RunStatus.INTERRUPTED}
            )
        elif handle.error is not None:
            # outside the run's own redaction: an exception may quote a secret the run read
            error = process_redactor().text(str(handle.error)) or type(handle.error).__name__
            log.error("run of %s could not run: %s", name, error, extra={**extra, "error": error})
            if handle.fire.request_id is not None:
                self.store.settle_request(handle.fire.request_id, status=RequestStatus.REJECTED, error=error)
            if handle.run_id is not None:
                # the engine could not close its run (the database failed under it, say)
                self.store.end_run(handle.run_id, status=RunStatus.FAILED, reason=f"the daemon lost the run: {error}")
        self.pump()
