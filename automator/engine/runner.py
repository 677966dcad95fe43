"""Running a workflow: the glue around the pipeline — start, resume, timeouts, on_failure.

The run keeps one promise above all: every item a fetch produced ends in exactly one
outcome (delivered, skipped, quarantined, failed), recorded in the history, whatever
happens to the run — a failing step, a timeout, an interruption, a crash (the resumed run
finishes it). Items flow in chunks (:mod:`.pipeline`) through one driver per step shape
(:mod:`.drivers`); every state change goes through the recorder (:mod:`.recorder`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from automator.engine.calls import describe_error
from automator.engine.context import RunContext
from automator.engine.drivers import make_caller
from automator.engine.pipeline import Pipeline, ProgressCallback
from automator.engine.recorder import Recorder, StepRecord
from automator.errors import ConfigError, HistoryError
from automator.history.states import RunStatus, StepStatus
from automator.history.store import History
from automator.plugins.events import RunInfo, RunStarted
from automator.plugins.manager import Plugins
from automator.plugins.steps import DeliverStep, Item, Step
from automator.spec.loader import BoundStep, Workflow

log = logging.getLogger("automator.engine")
HEARTBEAT_SECONDS = 10.0

__all__ = ["HEARTBEAT_SECONDS", "ProgressCallback", "Run", "RunResult", "owner_id", "resolve_params", "run_workflow"]


@dataclass
class RunResult:
    run_id: int
    workflow: str
    status: str
    error: str | None
    error_step: str | None
    counts: dict[str, int]
    summaries: list[tuple[str, str]] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def succeeded(self) -> bool:
        return self.status == RunStatus.SUCCEEDED


class _StopRun(Exception):  # noqa: N818 - control flow inside the runner
    def __init__(self, error: str, step_id: str | None) -> None:
        super().__init__(error)
        self.error = error
        self.step_id = step_id


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def resolve_params(workflow: Workflow, given: dict[str, Any] | None) -> dict[str, Any]:
    params = dict(workflow.spec.params)
    for name, value in (given or {}).items():
        if name not in params:
            known = ", ".join(sorted(params)) or "none"
            raise ConfigError(f"unknown parameter {name!r} for workflow {workflow.name} (declared: {known})")
        params[name] = value
    return params


class Run:
    """One run of one workflow."""

    def __init__(
        self,
        workflow: Workflow,
        history: History,
        plugins: Plugins,
        *,
        params: dict[str, Any] | None = None,
        trigger: str = "cli",
        scheduled_for: datetime | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.workflow = workflow
        self.history = history
        self.plugins = plugins
        self.params = resolve_params(workflow, params)
        self.trigger = trigger
        self.scheduled_for = scheduled_for
        self.progress = progress
        self.counts = {"fetched": 0, "delivered": 0, "skipped": 0, "quarantined": 0, "failed": 0}
        self._resumed = False
        self.summaries: list[tuple[str, str]] = []
        self.context: RunContext | None = None
        self.recorder: Recorder | None = None
        self.pipeline: Pipeline | None = None
        self.owner = owner_id()

    # -- running ----------------------------------------------------------------------

    async def execute(self) -> RunResult:
        wf = self.workflow
        record = self.history.start_run(
            workflow=wf.name,
            version=wf.version,
            # absolute: `automator resume ID` finds the file from any folder
            path=str(wf.path.resolve()),
            trigger=self.trigger,
            params=self.params,
            scheduled_for=self.scheduled_for,
            owner=self.owner,
        )
        return await self._execute(record.id, record.started_at, self._run_pipeline)

    async def resume(self, run_id: int) -> RunResult:
        """Continue a crashed run in its own run id: its open chunks, through the item steps.

        Items that already ended keep their outcome and are not redone; the pending ones
        restart after the fetch, from the data the ledger keeps, and pass by the deliver
        steps the ledger says they reached already. A pending item whose key another run
        delivered meanwhile ends ``skipped`` before any step sees it. Only a delivery in
        flight at the crash is sent again, with the same idempotency key, so the receiver
        can tell the repeat. The caller has claimed the run (status ``running``, owner).
        """
        record = self.history.get_run(run_id)
        if record is None:
            raise HistoryError(f"no run with id {run_id} to resume")
        # the crashed process could not finish its step rows: they end here, so that a
        # finished run has no running step (its model calls stay with the attempt that made them)
        self.history.close_open_steps(
            run_id, status=StepStatus.CRASHED, error="the run's process stopped during this step"
        )
        self.trigger = record.trigger
        self._resumed = True
        self.scheduled_for = record.scheduled_for
        self.params = dict(record.params or {})
        self.counts.update(self.history.ledger.counts(run_id))
        return await self._execute(record.id, record.started_at, lambda: self._resume_pipeline(run_id))

    async def _resume_pipeline(self, run_id: int) -> None:
        pipeline, ledger = self._pipeline(), self.history.ledger
        # the dead process's leases end now (recovery established it is gone); a run
        # recorded before chunks existed gets chunks for its pending items
        await ledger.release(run_id)
        await ledger.cover(run_id, pipeline.chunk_size)
        # every chunk: the done ones tell where each fetch was; the open ones are claimed
        chunks = await asyncio.to_thread(ledger.chunk_rows, run_id)
        finished = await asyncio.to_thread(ledger.finished_steps, run_id)
        await pipeline.resume(chunks, finished)
        if pipeline.resent:
            log.warning(
                "run %s: %d deliveries were in flight when its process stopped; sent again with the same "
                "idempotency key",
                run_id,
                pipeline.resent,
            )
        await self._finish_pipeline(pipeline)

    async def _run_pipeline(self) -> None:
        pipeline = self._pipeline()
        await pipeline.run()
        await self._finish_pipeline(pipeline)

    def _pipeline(self) -> Pipeline:
        assert self.recorder is not None
        assert self.context is not None
        steps = {b.id: self._make_step(b) for b in self.workflow.steps}
        self.pipeline = Pipeline(self.workflow, self.recorder, steps, progress=self.progress)
        return self.pipeline

    async def _finish_pipeline(self, pipeline: Pipeline) -> None:
        failed = await self._close_steps()
        await pipeline.finish_steps(failed)
        self.summaries = pipeline.summaries()
        if pipeline.stop is not None:
            raise _StopRun(pipeline.stop.error, pipeline.stop.step_id)
        if failed:
            # a deliverer that finishes its delivery in close() (file.deliver assembles its
            # file there) did not: the run must not say it succeeded
            step_id, error = next(iter(failed.items()))
            raise _StopRun(f"step {step_id} could not finish: {error}", step_id)

    async def _close_steps(self) -> dict[str, str]:
        """Each step's close(), once, in order; the steps whose close() failed, with why."""
        pipeline = self.pipeline
        failed: dict[str, str] = {}
        if pipeline is None:
            return failed
        steps, pipeline.steps = pipeline.steps, {}
        for step in steps.values():
            try:
                await step.close()
            except Exception as exc:  # noqa: BLE001 - recorded on the step and the run
                error = self.context.redactor.text(describe_error(exc)) if self.context else describe_error(exc)
                log.warning("step %s: close() failed: %s", step.step_id, error)
                failed[step.step_id] = error or type(exc).__name__
        return failed

    async def notify_failure(self, run_id: int) -> RunResult:
        """Run the on_failure steps for a run that ended without its engine (it crashed)."""
        record = self.history.get_run(run_id)
        if record is None:
            raise HistoryError(f"no run with id {run_id}")
        self.trigger, self.scheduled_for = record.trigger, record.scheduled_for
        self.params = dict(record.params or {})
        self.counts = {k: getattr(record, k) for k in self.counts}
        info = RunInfo(
            id=run_id,
            workflow=self.workflow.name,
            trigger=record.trigger,
            started_at=record.started_at,
            version=record.workflow_version,
            scheduled_for=record.scheduled_for,
        )
        self.context = RunContext(self.workflow, self.plugins, self.history, info, self.params)
        self.recorder = Recorder(self.history, self.plugins, self.context, self.owner)
        await self._on_failure(record.status, record.error, record.error_step)
        return RunResult(run_id, self.workflow.name, record.status, record.error, record.error_step, dict(self.counts))

    async def _execute(self, run_id: int, started_at: datetime, body: Callable[[], Awaitable[None]]) -> RunResult:
        wf = self.workflow
        info = RunInfo(
            id=run_id,
            workflow=wf.name,
            trigger=self.trigger,
            started_at=started_at,
            version=wf.version,
            scheduled_for=self.scheduled_for,
            resumed=self._resumed,
        )
        self.context = ctx = RunContext(wf, self.plugins, self.history, info, self.params)
        self.recorder = recorder = Recorder(self.history, self.plugins, ctx, self.owner)
        recorder.counts = self.counts  # one dict: a resumed run starts from its recorded outcomes
        self.plugins.run_started(RunStarted(info))
        started = time.monotonic()
        status, error, error_step = RunStatus.SUCCEEDED, None, None
        heartbeat = asyncio.create_task(self._heartbeat())
        timeout = wf.spec.timeout.total_seconds() if wf.spec.timeout else None
        try:
            async with asyncio.timeout(timeout):
                await body()
        except _StopRun as stop:
            status, error, error_step = RunStatus.FAILED, stop.error, stop.step_id
        except TimeoutError:
            status, error = RunStatus.TIMED_OUT, f"the run exceeded its timeout of {timeout:g}s"
        except asyncio.CancelledError:
            status, error = RunStatus.INTERRUPTED, "the run was interrupted"
            raise
        except HistoryError as exc:
            # the history could not be written (locked past its retries, read-only): the run
            # stops, and its end is recorded below if the database takes it by then
            status, error = RunStatus.FAILED, f"the run history could not be written: {exc.message}"
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self._close_steps()
            duration = time.monotonic() - started
            error = await self._end(status, error, error_step, duration)
            status = self._status
            error_step = self._error_step
        if status != RunStatus.SUCCEEDED and wf.on_failure:
            await self._on_failure(status, error, error_step)
        return RunResult(info.id, wf.name, status, error, error_step, dict(self.counts), self.summaries, duration)

    async def _end(self, status: RunStatus, error: str | None, error_step: str | None, duration: float) -> str | None:
        """The run's end in the history: leftover items fail, open steps close, the run row ends.

        Runs in the ``finally`` of the run, possibly while it is being cancelled: its writes
        are queued in order and done whatever happens to the run's task (History.commit is
        shielded). Raises HistoryError (saying the run is left to recover) when the database
        does not take it.
        """
        assert self.recorder is not None
        assert self.context is not None
        recorder = self.recorder
        run_id = self.context.run_id
        try:
            leftover = error or "the run ended before the item was processed"
            if self.pipeline is not None:
                await self.pipeline.end_leftovers(leftover, error_step)
            if status == RunStatus.SUCCEEDED and self.counts["failed"]:
                assert recorder.first_failure is not None
                step_id, reason = recorder.first_failure
                status, error_step = RunStatus.FAILED, step_id
                error = f"{self.counts['failed']} item(s) failed; first: {reason}"
            error = self.context.redactor.text(error)
            await self._close_open_steps(status, error)
            await recorder.run_finished(status, error, error_step, duration)
        except HistoryError as exc:
            raise HistoryError(
                f"run {run_id} ended {status}{f' ({error})' if error else ''}, but the history could not "
                f"record it: {exc.message}",
                hint=f"the next `automator run` of the workflow (or `automator resume {run_id}`, or the daemon) "
                "finishes the run once the database can be written",
            ) from None
        self._status: RunStatus = status
        self._error_step = error_step
        return error

    async def _close_open_steps(self, run_status: str, error: str | None) -> None:
        """Steps the run's end cut short (a signal, the run's timeout) end with the run."""
        assert self.recorder is not None
        status = run_status if run_status in (RunStatus.INTERRUPTED, RunStatus.TIMED_OUT) else StepStatus.FAILED
        for record in list(self.recorder.open_steps.values()):
            await self.recorder.step_finished(
                record,
                status=StepStatus(status),
                error=error or f"the run ended {run_status} before the step finished",
                retries=0,
                summary=None,
            )

    async def _heartbeat(self) -> None:
        assert self.recorder is not None
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self.recorder.heartbeat()
            except HistoryError as exc:
                # a missed beat is not the run's end (the next one tries again); the task must
                # not die with an exception nobody retrieves
                log.warning("run %s: heartbeat not recorded: %s", self.recorder.run_id, exc.message)

    def _make_step(self, bound: BoundStep) -> Step[Any]:
        assert self.context is not None
        return bound.type(bound.config, self.context, bound.id)

    # -- failure notifications --------------------------------------------------------

    async def _on_failure(self, status: str, error: str | None, error_step: str | None) -> None:
        assert self.context is not None
        ctx = self.context
        ctx.set_run_vars(status=status, error=error, error_step=error_step, counts=dict(self.counts))
        notice = Item(
            seq=-1,
            data={
                "workflow": self.workflow.name,
                "run_id": ctx.run_id,
                "status": status,
                "error": error,
                "error_step": error_step,
                "counts": dict(self.counts),
            },
        )
        assert self.recorder is not None
        for bound in self.workflow.on_failure:
            step = self._make_step(bound)
            caller = make_caller(self.workflow, bound)
            record = StepRecord(bound)
            record.items_in = 1
            await self.recorder.step_started(record, items_in=1)
            try:
                deliverer = cast(DeliverStep[Any], step)
                if type(deliverer).deliver_batch is not None:
                    await caller.call(deliverer.deliver_batch, [notice])
                else:
                    await caller.call(deliverer.deliver, notice)
                outcome, problem = StepStatus.SUCCEEDED, None
            except Exception as exc:  # noqa: BLE001 - a failed notification is recorded, not raised
                outcome, problem = StepStatus.FAILED, describe_error(exc)
            finally:
                await step.close()
            record.items_out = 1 if outcome == StepStatus.SUCCEEDED else 0
            await self.recorder.step_finished(
                record, status=outcome, error=problem, retries=caller.retries, summary=None
            )


async def run_workflow(
    workflow: Workflow,
    history: History,
    plugins: Plugins,
    *,
    params: dict[str, Any] | None = None,
    trigger: str = "cli",
    scheduled_for: datetime | None = None,
    progress: ProgressCallback | None = None,
) -> RunResult:
    """Run a loaded workflow once and record everything in the history."""
    run = Run(
        workflow, history, plugins, params=params, trigger=trigger, scheduled_for=scheduled_for, progress=progress
    )
    return await run.execute()
