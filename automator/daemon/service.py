"""The daemon: load the folder, recover, catch up, schedule, watch, and stop gracefully.

One asyncio loop in the main thread runs APScheduler 3 (``AsyncIOScheduler``, in-memory
jobs only — what must survive a restart is in the history database), the housekeeping
(hot reload, manual triggers, heartbeats, crash checks, retention) and the dispatcher.
Runs happen in their own threads (see ``runs``); database work of the housekeeping goes
to a worker thread, so the scheduler never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from automator.daemon import catchup, control
from automator.daemon.dispatch import Dispatcher
from automator.daemon.folder import Changes, WorkflowFolder
from automator.daemon.http import StatusServer
from automator.daemon.metrics import Metrics, MetricsObserver
from automator.daemon.plugin_watch import PluginWatch
from automator.daemon.recovery import Recovery
from automator.daemon.retention import Retention
from automator.daemon.runs import Fire, RunIds, RunThread
from automator.daemon.triggers import describe, local_at, schedule_trigger
from automator.engine.recovery import CrashRecovery
from automator.engine.runner import HEARTBEAT_SECONDS, owner_id
from automator.errors import AutomatorError
from automator.history.daemon_store import DaemonStore
from automator.history.protocols import SchedulerStore
from automator.history.states import RequestStatus, RunStatus
from automator.history.store import History
from automator.plugins.manager import Plugins
from automator.spec.loader import Workflow

log = logging.getLogger("automator.daemon")

RETENTION_EVERY = timedelta(days=1)
RETENTION_FIRST_AFTER = timedelta(seconds=60)  # let start-up and catch-up settle first
EXIT_STOPPED_AT_ONCE = 1  # a second SIGTERM/SIGINT


@dataclass
class DaemonOptions:
    workflows_dir: Path
    http: tuple[str, int] | None = None
    grace: float = 30.0
    keep: timedelta | None = timedelta(days=30)
    prune_every: timedelta = RETENTION_EVERY  # shorter only for tests (hidden --prune-every)
    max_concurrent_runs: int = 16
    poll_interval: float = 1.0  # hot reload and manual triggers
    recovery_interval: float = 30.0
    stale_after: timedelta = timedelta(minutes=2)
    plugins_dir: Path | None = None  # watched only to say that a changed plugin needs a restart


class _DispatchExecutor(BaseExecutor):
    """Hands each fire (with its scheduled time) to the dispatcher, which decides what to do.

    APScheduler's own executors would drop a fire later than ``misfire_grace_time`` and
    would not tell the job its scheduled time; the dispatcher needs both right.
    """

    def submit_job(self, job: Any, run_times: list[datetime]) -> None:
        for run_time in run_times:
            job.func(*job.args, run_time)

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:  # pragma: no cover - unused
        raise NotImplementedError


@dataclass
class _Scheduled:
    schedule: dict[str, Any]
    job: bool  # whether an APScheduler job exists (an `at:` in the past has none)


@dataclass
class Daemon:
    options: DaemonOptions
    history: History
    plugins: Plugins
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        self.store: SchedulerStore = DaemonStore(self.history)
        self.folder = WorkflowFolder(self.options.workflows_dir, self.plugins)
        self.me = owner_id()
        self.process_started = datetime.now(UTC)
        self.recovery = Recovery(
            CrashRecovery(self.history, self.store, self.me, self.process_started, self.options.stale_after),
            self.options.workflows_dir,
        )
        self.retention = Retention(self.store, self.options.keep) if self.options.keep else None
        self._scheduled: dict[str, _Scheduled] = {}
        self.plugin_watch = PluginWatch(self.options.plugins_dir)
        self._stop = asyncio.Event()
        self._signals = 0
        self._last_tick = time.monotonic()
        self.scheduler: AsyncIOScheduler | None = None
        self.dispatcher: Dispatcher | None = None
        self.http: StatusServer | None = None
        self.plugins.pm.register(MetricsObserver(self.metrics), name="automator.daemon.metrics")
        self.plugins.pm.register(RunIds(self._run_started), name="automator.daemon.runs")

    # -- the whole life ---------------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.dispatcher = Dispatcher(
            history=self.history,
            store=self.store,
            plugins=self.plugins,
            metrics=self.metrics,
            workflows=lambda: self.folder.workflows,
            max_concurrent_runs=self.options.max_concurrent_runs,
            loop=loop,
        )
        # in a thread: the signal handlers above stay live while the folder is read
        changes = await asyncio.to_thread(self.folder.scan)
        self._count_reloads(changes)
        self.scheduler = AsyncIOScheduler(
            executors={"default": _DispatchExecutor()},
            # fires are never dropped for being late: the dispatcher records what it does with each
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
            timezone=UTC,
        )
        if self.options.http is not None:
            host, port = self.options.http
            self.http = StatusServer(host, port, self.metrics.registry, self._health)
            self.http.start()
        for fire in await asyncio.to_thread(self.recovery.scan, set(), self.folder.workflows):
            self.dispatcher.fire(fire)
        self.scheduler.start()
        for workflow in self.folder.workflows.values():
            await self._schedule_one(workflow, startup=True)
        self.metrics.up.set(1)
        self._update_gauges()
        log.info(
            "daemon started: %d workflow(s) from %s%s",
            len(self.folder.workflows),
            self.options.workflows_dir,
            f", http on {self.http.address}" if self.http else "",
            extra={
                "workflows": sorted(self.folder.workflows),
                "http": self.http.address if self.http else None,
                "owner": self.me,
            },
        )
        tasks = [asyncio.create_task(self._housekeeping(), name="housekeeping")]
        if self.retention is not None:
            tasks.append(asyncio.create_task(self._retention_loop(), name="retention"))
        for task in tasks:
            task.add_done_callback(self._task_ended)
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._shutdown()
        return 0

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        # a bug in housekeeping must be seen: /healthz turns 503 (no ticks) and this says why
        if not task.cancelled() and task.exception() is not None:
            log.critical("%s stopped: %r", task.get_name(), task.exception(), exc_info=task.exception())

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info(
                "%s: stopping; running runs get %gs to finish", sig.name, self.options.grace, extra={"signal": sig.name}
            )
            self._stop.set()
            return
        # Nothing is written: the run threads are still writing their ledgers, and closing
        # their runs under them would race (an item marked failed, then delivered). The
        # runs stay `running` under this process's owner id, which is gone a moment later;
        # crash recovery (at the next start, or every 30 s in another daemon on this
        # database) marks them crashed and resumes or fails them per `on_crash`.
        log.warning(
            "%s again: stopping now; %d run(s) in flight are left to crash recovery",
            sig.name,
            len(self.dispatcher.running) if self.dispatcher else 0,
            extra={"signal": sig.name},
        )
        logging.shutdown()
        os._exit(EXIT_STOPPED_AT_ONCE)

    async def _shutdown(self) -> None:
        assert self.dispatcher is not None
        assert self.scheduler is not None
        dispatcher = self.dispatcher
        dispatcher.accepting = False
        self.scheduler.shutdown(wait=False)
        self.metrics.up.set(0)
        for fire in list(dispatcher.waiting):
            await self._drop_waiting(fire)
        dispatcher.waiting.clear()
        deadline = time.monotonic() + self.options.grace
        while dispatcher.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = dispatcher.running
        if left:
            log.warning("grace period over: interrupting %d run(s)", len(left))
            for handle in left:
                handle.cancel()
            # the engine records the interruption itself; give it a moment to write
            stop_waiting = time.monotonic() + 5
            while any(h.alive() for h in left) and time.monotonic() < stop_waiting:
                await asyncio.sleep(0.05)
        self._end_unfinished("the run was interrupted: the daemon stopped")
        await asyncio.to_thread(self._save_fires)
        if self.http is not None:
            self.http.stop()
        log.info("daemon stopped")

    async def _drop_waiting(self, fire: Fire) -> None:
        """A fire still waiting at shutdown: recorded as skipped, so the history shows it."""
        workflow = fire.pinned or self.folder.workflows.get(fire.workflow)
        if fire.notify_run_id is not None:
            return  # a crashed run's notice: the run itself is recorded already
        if fire.resume_run_id is not None or workflow is None:
            return  # a claimed resume stays `running`: the next start resumes it again
        if fire.request_id is not None:
            await asyncio.to_thread(
                self.store.settle_request,
                fire.request_id,
                status=RequestStatus.REJECTED,
                error="the daemon stopped first",
            )
            return
        await asyncio.to_thread(
            self.store.record_skipped,
            workflow=workflow.name,
            version=workflow.version,
            path=str(workflow.path),
            trigger=fire.trigger,
            scheduled_for=fire.scheduled_for,
            reason="skipped: the daemon stopped before the fire could run",
            owner=self.me,
        )

    def _end_unfinished(self, reason: str) -> None:
        """Runs whose thread did not finish: close them in the history (pending items fail)."""
        if self.dispatcher is None:
            return
        for handle in self.dispatcher.running:
            if handle.alive() and handle.run_id is not None:
                with contextlib.suppress(AutomatorError):
                    self.store.end_run(handle.run_id, status=RunStatus.INTERRUPTED, reason=reason)

    # -- schedules --------------------------------------------------------------------

    async def _schedule(self, workflow: Workflow, *, startup: bool) -> None:
        assert self.scheduler is not None
        assert self.dispatcher is not None
        name, schedule = workflow.name, workflow.spec.schedule
        known = self._scheduled.get(name)
        wanted = schedule.model_dump(mode="json") if schedule is not None else None
        if known is not None and known.schedule == wanted:
            return  # same schedule: the new version is picked up at the next fire
        self._unschedule(name)
        if schedule is None or wanted is None:
            return
        registered = await asyncio.to_thread(self.store.register, name, describe(schedule))
        now = datetime.now(UTC)
        anchor: datetime | None = None
        if startup:
            anchor = await asyncio.to_thread(self._catch_up, workflow, registered, now)
        if schedule.at is not None and local_at(schedule) <= now:
            self._scheduled[name] = _Scheduled(wanted, job=False)
            log.info("%s: its `at:` time has passed; nothing to schedule", name, extra={"workflow": name})
            return
        trigger = schedule_trigger(schedule, anchor=anchor)
        job = self.scheduler.add_job(self._fired, trigger, args=[name], id=name, name=name, replace_existing=True)
        self._scheduled[name] = _Scheduled(wanted, job=True)
        log.info(
            "scheduled %s: %s, next at %s",
            name,
            describe(schedule),
            job.next_run_time.isoformat() if job.next_run_time else "never",
            extra={"workflow": name, "next_fire": job.next_run_time},
        )

    def _catch_up(self, workflow: Workflow, registered: datetime, now: datetime) -> datetime | None:
        """Dispatch the missed fires per ``catch_up``; returns the latest due fire (interval anchor)."""
        assert self.dispatcher is not None
        assert workflow.spec.schedule is not None
        schedule = workflow.spec.schedule
        last, _ = self.store.last_fires().get(workflow.name, (None, registered))
        from_runs = self.store.last_scheduled_run(workflow.name)
        candidates = [t for t in (last, from_runs) if t is not None]
        since = max(candidates) if candidates else registered
        if since >= now - timedelta(seconds=1):
            return since if candidates else None
        plan = catchup.plan(schedule, since, now)
        if plan.missed:
            log.info(
                "%s: %d fire(s) missed while the daemon was down; catch_up %s runs %d",
                workflow.name,
                plan.missed,
                schedule.catch_up,
                len(plan.run),
                extra={"workflow": workflow.name, "missed": plan.missed, "catch_up": schedule.catch_up},
            )
        for when in plan.run:
            self.dispatcher.loop.call_soon_threadsafe(
                self.dispatcher.fire, Fire(workflow=workflow.name, trigger="catch_up", scheduled_for=when)
            )
        if plan.missed and not plan.run:
            # catch_up: none — the missed fires count as handled
            self.dispatcher.loop.call_soon_threadsafe(self._note_fire, workflow.name, now)
        if schedule.every is not None:
            step = schedule.every.total_seconds()
            return since + timedelta(seconds=step * int((now - since).total_seconds() // step))
        return None

    def _note_fire(self, name: str, when: datetime) -> None:
        assert self.dispatcher is not None
        self.dispatcher.fired[name] = when

    def _unschedule(self, name: str) -> None:
        known = self._scheduled.pop(name, None)
        if known is not None and known.job and self.scheduler is not None:
            with contextlib.suppress(JobLookupError):
                self.scheduler.remove_job(name)

    def _fired(self, name: str, scheduled_for: datetime | None = None) -> None:
        # the default only satisfies APScheduler's signature check: _DispatchExecutor always passes it
        assert self.dispatcher is not None
        self.dispatcher.fire(Fire(workflow=name, trigger="schedule", scheduled_for=scheduled_for))

    # -- housekeeping -----------------------------------------------------------------

    async def _housekeeping(self) -> None:
        assert self.dispatcher is not None
        last_beat = last_recovery = last_usage = time.monotonic()
        while True:
            await asyncio.sleep(self.options.poll_interval)
            self._last_tick = now = time.monotonic()
            try:
                changes = await asyncio.to_thread(self.folder.scan)
                if changes:
                    await self._apply(changes)
                await asyncio.to_thread(self.plugin_watch.check)
                for fire in await asyncio.to_thread(
                    control.take_requests, self.store, self.me, dict(self.folder.workflows)
                ):
                    self.dispatcher.fire(fire)
                await asyncio.to_thread(self._save_fires)
                if now - last_beat >= HEARTBEAT_SECONDS:
                    last_beat = now
                    await asyncio.to_thread(self.store.heartbeat, sorted(self.dispatcher.my_run_ids()))
                if now - last_recovery >= self.options.recovery_interval:
                    last_recovery = now
                    mine = self.dispatcher.my_run_ids()
                    for fire in await asyncio.to_thread(self.recovery.scan, mine, dict(self.folder.workflows)):
                        self.dispatcher.fire(fire)
                if now - last_usage >= 5:
                    last_usage = now
                    await asyncio.to_thread(self.metrics.read_model_usage, self.history.model_calls)
            except AutomatorError as exc:
                # the database may be away for a moment; the daemon keeps its schedule
                log.error("housekeeping: %s", exc.message, extra={"error": exc.message})
            except Exception as exc:
                # a bug in one round (a file, a plugin) must not end hot reload, manual triggers
                # and crash recovery for good: log it with its traceback and go on with the next
                log.exception("housekeeping round failed: %r", exc, extra={"error": type(exc).__name__})
            self._update_gauges()
            self.metrics.housekeeping_rounds.inc()

    async def _apply(self, changes: Changes) -> None:
        self._count_reloads(changes)
        for name in changes.removed:
            self._unschedule(name)
            log.info("workflow %s removed: no longer scheduled", name, extra={"workflow": name})
        for workflow in changes.updated:
            log.info(
                "workflow %s loaded (version %s)",
                workflow.name,
                workflow.version,
                extra={"workflow": workflow.name, "version": workflow.version, "file": str(workflow.path)},
            )
            await self._schedule_one(workflow, startup=False)

    async def _schedule_one(self, workflow: Workflow, *, startup: bool) -> None:
        """Schedule one workflow; a failure costs that workflow only, never the others or the daemon."""
        try:
            await self._schedule(workflow, startup=startup)
        except AutomatorError:
            raise  # the database: housekeeping says so and tries again
        except Exception:
            # a bug (a schedule the trigger library cannot compute, say): the workflow is not
            # scheduled and the log says why, with the traceback; the other workflows go on
            self._unschedule(workflow.name)
            log.exception("cannot schedule workflow %s", workflow.name, extra={"workflow": workflow.name})

    def _count_reloads(self, changes: Changes) -> None:
        if changes.updated:
            self.metrics.reloads.labels("ok").inc(len(changes.updated))
        if changes.broken:
            self.metrics.reloads.labels("invalid").inc(len(changes.broken))
        if changes.removed:
            self.metrics.reloads.labels("removed").inc(len(changes.removed))

    def _update_gauges(self) -> None:
        self.metrics.workflows.set(len(self.folder.workflows))
        self.metrics.invalid_files.set(len(self.folder.broken))

    def _save_fires(self) -> None:
        assert self.dispatcher is not None
        fired, self.dispatcher.fired = self.dispatcher.fired, {}
        try:
            self.store.save_fires(fired)
        except AutomatorError:
            for name, when in fired.items():  # keep them for the next try
                previous = self.dispatcher.fired.get(name)
                self.dispatcher.fired[name] = max(when, previous) if previous else when
            raise

    async def _retention_loop(self) -> None:
        assert self.retention is not None
        every = self.options.prune_every.total_seconds()
        await asyncio.sleep(min(RETENTION_FIRST_AFTER.total_seconds(), every))
        while True:
            try:
                removed = await asyncio.to_thread(self.retention.prune)
                self.metrics.pruned.inc(removed)
            except AutomatorError as exc:
                # the database busy or away for a moment (a HistoryError): try again at the next round
                log.error("retention: %s", exc.message, extra={"error": type(exc).__name__})
            await asyncio.sleep(every)

    # -- observers and health ---------------------------------------------------------

    def _run_started(self, handle: RunThread) -> None:
        """In the run's thread, right after the run is recorded: answer a manual request."""
        if handle.fire.request_id is not None and handle.run_id is not None:
            self.store.settle_request(handle.fire.request_id, status=RequestStatus.STARTED, run_id=handle.run_id)

    def _health(self) -> tuple[bool, dict[str, Any]]:
        details: dict[str, Any] = {}
        ok = True
        scheduler_ok = self.scheduler is not None and self.scheduler.running and not self._stop.is_set()
        stalled = time.monotonic() - self._last_tick > max(10.0, self.options.poll_interval * 10)
        details["scheduler"] = "stalled" if stalled else ("running" if scheduler_ok else "stopped")
        ok = scheduler_ok and not stalled
        try:
            self.store.ping()
            details["database"] = "ok"
        except AutomatorError as exc:
            details["database"] = exc.message
            ok = False
        details["workflows"] = len(self.folder.workflows)
        details["invalid_files"] = len(self.folder.broken)
        details["active_runs"] = len(self.dispatcher.running) if self.dispatcher else 0
        return ok, details
