"""Running a workflow: steps in order, items through them, every outcome in the ledger.

The run keeps one promise above all: every item a fetch produced ends in exactly one
outcome (delivered, skipped, quarantined, failed), recorded in the history, whatever
happens to the run — a failing step, a timeout, an interruption.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from automator.engine.calls import Caller, describe_error
from automator.engine.context import RunContext
from automator.errors import ConfigError, HistoryError, QuarantineItem, SkipItem, StepError
from automator.history.states import Outcome, RunStatus, StepStatus
from automator.history.store import History, ItemRow, OutcomeRow
from automator.plugins.events import ItemOutcome, RunFinished, RunInfo, RunStarted, StepFinished, StepStarted
from automator.plugins.manager import Plugins
from automator.plugins.steps import PHASE_METHOD, DeliverStep, FetchStep, Item, Phase, Step
from automator.spec.loader import BoundStep, Workflow

ProgressCallback = Callable[[str, int, int], None]
log = logging.getLogger("automator.engine")
HEARTBEAT_SECONDS = 10.0
FLUSH_EVERY = 500
# deliveries are written down soon after they happen (after 20 of them, or 0.2 s): a run
# resumed after a crash must not send them again
DELIVERY_FLUSH_EVERY = 20
DELIVERY_FLUSH_SECONDS = 0.2


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
        self.items: list[Item] = []
        self.active: list[Item] = []
        self.counts = {"fetched": 0, "delivered": 0, "skipped": 0, "quarantined": 0, "failed": 0}
        self._pending_outcomes: list[OutcomeRow] = []
        self._pending_progress: list[tuple[int, list[str]]] = []
        self._delivered_by: dict[int, list[str]] = {}  # item seq -> deliver steps it passed
        self._step_delivered = 0
        self._flushed_at = time.monotonic()
        self._resumed = False
        self._fetched_by: dict[int, str] = {}  # a resumed run's pending items: seq -> their fetch step
        self._ended: set[int] = set()
        self._first_failure: tuple[str, str] | None = None
        self._item_events = plugins.wants_item_events  # asked once: it is per item otherwise
        self.summaries: list[tuple[str, str]] = []
        self.context: RunContext | None = None
        # step rows started and not finished yet: the run's end closes them (no step stays running)
        self._open_steps: dict[int, tuple[BoundStep, float, int]] = {}

    # -- the ledger -------------------------------------------------------------------

    def _end_item(self, item: Item, outcome: str, step_id: str | None, reason: str | None, result: Any = None) -> None:
        if item.seq in self._ended:
            return
        self._ended.add(item.seq)
        ctx = self.context
        assert ctx is not None
        reason = ctx.redactor.text(reason)
        result = ctx.redactor.data(result)
        self.counts[outcome] += 1
        self._pending_outcomes.append(OutcomeRow(item.seq, outcome, step_id, reason, result))
        if outcome == Outcome.FAILED and self._first_failure is None:
            self._first_failure = (step_id or "", reason or "")
        if self._item_events:
            data = ctx.redactor.data(item.data)  # listeners may log or post it: no secrets
            self.plugins.item_outcome(ItemOutcome(ctx.info, item.seq, item.key, outcome, step_id, reason, data))
        if len(self._pending_outcomes) >= FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        self._flushed_at = time.monotonic()
        if self.context is None:
            return
        # the rows are dropped only once written: a history that could not take them keeps
        # them for the next flush (the run's end tries again)
        if self._pending_progress:
            self.history.set_delivered_by(self.context.run_id, self._pending_progress)
            self._pending_progress = []
        if self._pending_outcomes:
            self.history.set_outcomes(self.context.run_id, self._pending_outcomes)
            self._pending_outcomes = []

    def _delivered(self, item: Item, bound: BoundStep, *, batch: bool = False) -> bool:
        """An item reached a receiver: write it down now. True if that ended the item."""
        self._step_delivered += 1
        if bound is self.workflow.steps[-1]:
            self._end_item(item, Outcome.DELIVERED, bound.id, None, item.data)
            ended = True
        else:
            passed = self._delivered_by.setdefault(item.seq, [])
            passed.append(bound.id)
            self._pending_progress.append((item.seq, list(passed)))
            ended = False
        if not batch and (
            len(self._pending_outcomes) + len(self._pending_progress) >= DELIVERY_FLUSH_EVERY
            or time.monotonic() - self._flushed_at >= DELIVERY_FLUSH_SECONDS
        ):
            self._flush()
        return ended

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
            owner=owner_id(),
        )
        return await self._execute(record.id, record.started_at, self._run_steps)

    async def resume(self, run_id: int) -> RunResult:
        """Continue a crashed run in its own run id: the item steps again, for its pending items.

        Items that already ended keep their outcome and are not redone; the pending ones
        restart after the fetch, from the data the fetch produced (as the ledger keeps it),
        and pass by the deliver steps the ledger says they reached already. A pending item
        whose key another run delivered meanwhile (a later ``automator run``, say) ends
        ``skipped`` before any step sees it. Only a delivery in flight at the crash is sent
        again, with the same idempotency key, so the receiver can tell the repeat. The
        caller has claimed the run (status ``running``, owner).
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
        for row in self.history.items(run_id):
            item = Item(seq=row.seq, data=row.data, key=row.key, steps={row.fetched_by: row.data})
            if row.delivered_by:
                self._delivered_by[row.seq] = list(row.delivered_by)
            self.items.append(item)
            if row.outcome == Outcome.PENDING:
                self.active.append(item)
                self._fetched_by[row.seq] = row.fetched_by
            else:
                self._ended.add(row.seq)
                self.counts[row.outcome] += 1
        self.counts["fetched"] = len(self.items)
        return await self._execute(record.id, record.started_at, self._resume_item_steps)

    async def _resume_item_steps(self) -> None:
        self._skip_delivered_elsewhere()
        await self._run_item_steps()

    def _skip_delivered_elsewhere(self) -> None:
        """Pending items whose key any other run delivered (since this one fetched them) are skipped.

        The run checked the keys when it fetched; a run started while this one lay dead may
        have delivered them since. Only for fetch steps whose ``only_new`` is in effect, as
        at the fetch.
        """
        assert self.context is not None
        fetchers = {bound.id: bound for bound in self.workflow.steps if bound.phase is Phase.FETCH}

        def checked(item: Item) -> bool:
            bound = fetchers.get(self._fetched_by.get(item.seq, ""))
            return item.key is not None and bound is not None and bound.only_new

        candidates = [item for item in self.active if checked(item)]
        if not candidates:
            return
        keys = [item.key for item in candidates if item.key is not None]
        delivered = self.history.delivered_keys(self.workflow.name, keys, other_than=self.context.run_id)
        for item in candidates:
            if item.key in delivered:
                reason = f"already delivered by run {delivered[item.key]} (key {item.key!r})"
                self._end_item(item, Outcome.SKIPPED, self._fetched_by[item.seq], reason)
        self.active = [item for item in self.active if item.seq not in self._ended]

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
            leftover = error or "the run ended before the item was processed"
            for item in self.active:
                self._end_item(item, Outcome.FAILED, error_step, f"not processed: {leftover}")
            if status == RunStatus.SUCCEEDED and self.counts["failed"]:
                assert self._first_failure is not None
                step_id, reason = self._first_failure
                status, error_step = RunStatus.FAILED, step_id
                error = f"{self.counts['failed']} item(s) failed; first: {reason}"
            error = ctx.redactor.text(error)
            self._record_end(info.id, status, error, error_step)
            duration = time.monotonic() - started
            self.plugins.run_finished(RunFinished(info, status, error, dict(self.counts), duration))
        if status != RunStatus.SUCCEEDED and wf.on_failure:
            await self._on_failure(status, error, error_step)
        return RunResult(info.id, wf.name, status, error, error_step, dict(self.counts), self.summaries, duration)

    def _record_end(self, run_id: int, status: str, error: str | None, error_step: str | None) -> None:
        """The run's end in the history, or a HistoryError that says the run is left to recover."""
        try:
            self._close_open_steps(status, error)
            self._flush()
            self.history.finish_run(run_id, status=status, error=error, error_step=error_step, counts=self.counts)
        except HistoryError as exc:
            raise HistoryError(
                f"run {run_id} ended {status}{f' ({error})' if error else ''}, but the history could not "
                f"record it: {exc.message}",
                hint=f"the next `automator run` of the workflow (or `automator resume {run_id}`, or the daemon) "
                "finishes the run once the database can be written",
            ) from None

    def _close_open_steps(self, run_status: str, error: str | None) -> None:
        """Steps the run's end cut short (a signal, the run's timeout) end with the run."""
        status = run_status if run_status in (RunStatus.INTERRUPTED, RunStatus.TIMED_OUT) else StepStatus.FAILED
        for attempt_id, (bound, started, items_in) in list(self._open_steps.items()):
            self._step_finished(
                bound,
                attempt_id,
                started,
                status=status,
                error=error or f"the run ended {run_status} before the step finished",
                items_in=items_in,
                items_out=0,
                retries=0,
                summary=None,
            )

    async def _heartbeat(self) -> None:
        assert self.context is not None
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                self.history.update_counts(self.context.run_id, self.counts)
            except HistoryError as exc:
                # a missed beat is not the run's end (the next one tries again); the task must
                # not die with an exception nobody retrieves
                log.warning("run %s: heartbeat not recorded: %s", self.context.run_id, exc.message)

    async def _run_steps(self) -> None:
        for bound in self.workflow.steps:
            if bound.phase is Phase.FETCH:
                await self._fetch(bound)
            else:
                await self._item_step(bound)
            self._flush()
        self._end_active()

    async def _run_item_steps(self) -> None:
        """The steps after the fetch, for the items already in ``self.active`` (a resumed run)."""
        for bound in self.workflow.steps:
            if bound.phase is not Phase.FETCH:
                await self._item_step(bound)
                self._flush()
        self._end_active()

    def _end_active(self) -> None:
        """Items that passed every step are delivered."""
        for item in self.active:
            reason = (
                None
                if any(s.phase is Phase.DELIVER for s in self.workflow.steps)
                else ("passed every step (the workflow has no deliver step)")
            )
            self._end_item(item, Outcome.DELIVERED, self.workflow.steps[-1].id, reason, item.data)
        self.active = []

    def _make_step(self, bound: BoundStep) -> Step[Any]:
        assert self.context is not None
        return bound.type(bound.config, self.context, bound.id)

    def _caller(self, bound: BoundStep) -> Caller:
        defaults = self.workflow.spec.defaults
        return Caller(
            retry=bound.spec.retry or defaults.retry,
            timeout=bound.spec.timeout or defaults.timeout,
            blocking=bound.type.blocking,
        )

    def _step_started(self, bound: BoundStep, items_in: int, attempt: int = 1) -> tuple[int, float]:
        assert self.context is not None
        self.plugins.step_started(StepStarted(self.context.info, bound.id, bound.type.name, str(bound.phase), items_in))
        attempt_id = self.history.start_step(
            self.context.run_id,
            step_id=bound.id,
            step_type=bound.type.name,
            phase=str(bound.phase),
            attempt=attempt,
            items_in=items_in,
        )
        started = time.monotonic()
        self._open_steps[attempt_id] = (bound, started, items_in)
        return attempt_id, started

    def _step_finished(
        self,
        bound: BoundStep,
        attempt_id: int,
        started: float,
        *,
        status: str,
        error: str | None,
        items_in: int,
        items_out: int,
        retries: int,
        summary: str | None,
    ) -> None:
        assert self.context is not None
        self._open_steps.pop(attempt_id, None)
        redact = self.context.redactor.text
        self.history.finish_step(
            attempt_id,
            status=status,
            error=redact(error),
            items_out=items_out,
            retries=retries,
            summary=redact(summary),
        )
        self.plugins.step_finished(
            StepFinished(
                self.context.info,
                bound.id,
                bound.type.name,
                str(bound.phase),
                status,
                redact(error),
                items_in,
                items_out,
                time.monotonic() - started,
            )
        )

    # -- fetch ------------------------------------------------------------------------

    async def _fetch(self, bound: BoundStep) -> None:
        assert self.context is not None
        step = self._make_step(bound)
        caller = self._caller(bound)
        attempt_id, started = self._step_started(bound, 0)
        attempt = 1

        def fetch_failed(exc: BaseException, retries: int) -> str:
            error = self._timeout_text(exc, caller) or describe_error(exc)
            self._step_finished(
                bound,
                attempt_id,
                started,
                status=StepStatus.FAILED,
                error=error,
                items_in=0,
                items_out=0,
                retries=retries,
                summary=None,
            )
            return error

        def record_failed_attempt(exc: BaseException) -> None:
            # each try of a fetch is its own step attempt in the history
            nonlocal attempt_id, started, attempt
            fetch_failed(exc, 0)
            attempt += 1
            attempt_id, started = self._step_started(bound, 0, attempt=attempt)

        caller.on_failed_attempt = record_failed_attempt
        try:
            raw = await caller.call(cast(FetchStep[Any], step).fetch)
            if raw is None:
                raw = []
            elif not isinstance(raw, Iterable) or isinstance(raw, str | bytes | dict):
                raise StepError(
                    f"{bound.type.name} returned {type(raw).__name__}, not a list of items", retryable=False
                )
            fetched = list(raw)
        except Exception as exc:  # noqa: BLE001 - any failure of the fetch ends the run, recorded
            error = fetch_failed(exc, caller.retries)
            await step.close()
            raise _StopRun(f"step {bound.id} ({bound.type.name}) failed: {error}", bound.id) from None
        await step.close()
        new_items = self._admit(bound, fetched)
        summary = self.context.redactor.text(step.summary())  # shown by `automator run`: no secrets
        if summary:
            self.summaries.append((bound.id, summary))
        self._step_finished(
            bound,
            attempt_id,
            started,
            status=StepStatus.SUCCEEDED,
            error=None,
            items_in=0,
            items_out=len(new_items),
            retries=caller.retries,
            summary=summary,
        )

    def _admit(self, bound: BoundStep, fetched: list[Any]) -> list[Item]:
        """Number the fetched items, give them keys, enter them in the ledger, drop repeats."""
        assert self.context is not None
        ctx = self.context
        first_seq = len(self.items)
        items: list[Item] = []
        key_errors: dict[int, str] = {}
        for offset, data in enumerate(fetched):
            if not isinstance(data, dict):
                data = {"value": data}
            item = Item(seq=first_seq + offset, data=data, steps={bound.id: data})
            if bound.spec.key is not None:
                try:
                    item.key = ctx.render_text(bound.spec.key, item)
                except StepError as exc:
                    key_errors[item.seq] = f"key: {exc.message}"
            items.append(item)
        self.items.extend(items)
        self.counts["fetched"] += len(items)
        self.history.add_items(
            ctx.run_id,
            self.workflow.name,
            [ItemRow(i.seq, i.key, bound.id, ctx.redactor.data(i.data)) for i in items],
        )
        new_only = bound.only_new
        delivered = (
            self.history.delivered_keys(self.workflow.name, [i.key for i in items if i.key is not None])
            if new_only
            else {}
        )
        seen: dict[str, int] = {i.key: i.seq for i in self.active if i.key is not None}
        admitted: list[Item] = []
        for item in items:
            if item.seq in key_errors:
                self._end_item(item, Outcome.FAILED, bound.id, key_errors[item.seq])
            elif item.key is not None and item.key in delivered:
                self._end_item(
                    item, Outcome.SKIPPED, bound.id, f"already delivered (key {item.key!r}, run {delivered[item.key]})"
                )
            elif new_only and item.key is not None and item.key in seen:
                self._end_item(
                    item, Outcome.SKIPPED, bound.id, f"duplicate key {item.key!r} (same as item {seen[item.key]})"
                )
            else:
                if item.key is not None:
                    seen[item.key] = item.seq
                admitted.append(item)
        self.active.extend(admitted)
        return admitted

    # -- transform, validate, deliver -------------------------------------------------

    async def _item_step(self, bound: BoundStep) -> None:
        step = self._make_step(bound)
        caller = self._caller(bound)
        items = self.active
        attempt_id, started = self._step_started(bound, len(items))
        survivors: list[Item] = []
        failed_before = self.counts["failed"]
        self._step_delivered = 0
        # a resumed run: items this deliver step already sent before the crash pass by
        sent = [i for i in items if bound.id in self._delivered_by.get(i.seq, ())]
        todo = [i for i in items if bound.id not in self._delivered_by.get(i.seq, ())] if sent else items
        try:
            if bound.phase is Phase.DELIVER and cast(type[DeliverStep[Any]], type(step)).deliver_batch is not None:
                survivors = await self._deliver_batch(bound, step, caller, todo)
            elif bound.phase is Phase.TRANSFORM and getattr(step, "transform_batch", None) is not None:
                survivors = await self._transform_batch(bound, step, todo)
            else:
                survivors = await self._each_item(bound, step, caller, todo)
        finally:
            await step.close()
            self._flush()
        if sent:
            survivors = sorted([*sent, *survivors], key=lambda i: i.seq)
        self.active = survivors
        failed_here = self.counts["failed"] - failed_before
        items_out = len(survivors) + (self._step_delivered if bound is self.workflow.steps[-1] else 0)
        assert self.context is not None
        summary = self.context.redactor.text(step.summary())  # shown by `automator run`: no secrets
        if summary:
            self.summaries.append((bound.id, summary))
        self._step_finished(
            bound,
            attempt_id,
            started,
            status=StepStatus.SUCCEEDED,
            error=None,
            items_in=len(items),
            items_out=items_out,
            retries=caller.retries,
            summary=summary,
        )
        if failed_here and self.workflow.spec.on_item_error == "stop":
            assert self._first_failure is not None
            raise _StopRun(f"an item failed and on_item_error is stop: {self._first_failure[1]}", bound.id)

    async def _each_item(self, bound: BoundStep, step: Step[Any], caller: Caller, items: list[Item]) -> list[Item]:
        method = getattr(step, PHASE_METHOD[bound.phase])
        kept: list[Item | None] = [None] * len(items)
        done = 0
        total = len(items)

        concurrency = bound.spec.concurrency or bound.type.default_concurrency
        runs_inline = not (bound.type.blocking or inspect.iscoroutinefunction(method))

        async def one(index: int, item: Item) -> None:
            nonlocal done
            try:
                if runs_inline:
                    # the hot path for cheap sync steps: a plain call, no coroutine layers
                    try:
                        result = method(item)
                        if inspect.isawaitable(result):
                            result = await result
                    except Exception as first:  # noqa: BLE001 - re-raised unless a retry may help
                        result = await caller.retry_after_failure(method, (item,), first)
                else:
                    result = await caller.call(method, item)
            except SkipItem as signal:
                self._end_item(item, Outcome.SKIPPED, bound.id, signal.reason)
            except QuarantineItem as signal:
                self._end_item(item, Outcome.QUARANTINED, bound.id, signal.reason, item.data)
            except Exception as exc:  # noqa: BLE001 - the item fails, recorded; the run goes on
                error = self._timeout_text(exc, caller) or describe_error(exc)
                self._end_item(item, Outcome.FAILED, bound.id, error, item.data)
            else:
                if bound.phase is Phase.TRANSFORM:
                    if result is None:
                        self._end_item(item, Outcome.SKIPPED, bound.id, f"filtered out by {bound.id}")
                        return
                    item.data = result if isinstance(result, dict) else {"value": result}
                item.steps = {**item.steps, bound.id: item.data}
                if bound.phase is Phase.DELIVER and self._delivered(item, bound):
                    return
                kept[index] = item
            finally:
                done += 1
                if self.progress is not None and (done % 100 == 0 or done == total):
                    self.progress(bound.id, done, total)

        if runs_inline or concurrency <= 1:
            for index, item in enumerate(items):
                await one(index, item)
        else:
            limit = asyncio.Semaphore(concurrency)

            async def limited(index: int, item: Item) -> None:
                async with limit:
                    await one(index, item)

            await asyncio.gather(*(limited(i, item) for i, item in enumerate(items)))
        return [item for item in kept if item is not None]

    async def _transform_batch(self, bound: BoundStep, step: Step[Any], items: list[Item]) -> list[Item]:
        """All items through one call (a Batch API): one outcome per item, in order.

        No retry or per-item timeout around it: the step owns both (a batch may take hours,
        and calling it again must not submit the work twice).
        """
        if not items:
            return []
        try:
            outcomes = step.transform_batch(items)  # type: ignore[attr-defined]
            if inspect.isawaitable(outcomes):
                outcomes = await outcomes
            outcomes = list(outcomes)
            if len(outcomes) != len(items):
                raise StepError(f"{bound.type.name} returned {len(outcomes)} outcomes for {len(items)} items")
        except Exception as exc:  # noqa: BLE001 - all the step's items fail, recorded
            error = describe_error(exc)
            for item in items:
                self._end_item(item, Outcome.FAILED, bound.id, error, item.data)
            return []
        kept: list[Item] = []
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, SkipItem):
                self._end_item(item, Outcome.SKIPPED, bound.id, outcome.reason)
            elif isinstance(outcome, QuarantineItem):
                self._end_item(item, Outcome.QUARANTINED, bound.id, outcome.reason, item.data)
            elif isinstance(outcome, BaseException):
                self._end_item(item, Outcome.FAILED, bound.id, describe_error(outcome), item.data)
            elif outcome is None:
                self._end_item(item, Outcome.SKIPPED, bound.id, f"filtered out by {bound.id}")
            else:
                item.data = outcome if isinstance(outcome, dict) else {"value": outcome}
                item.steps = {**item.steps, bound.id: item.data}
                kept.append(item)
        if self.progress is not None:
            self.progress(bound.id, len(items), len(items))
        return kept

    async def _deliver_batch(self, bound: BoundStep, step: Step[Any], caller: Caller, items: list[Item]) -> list[Item]:
        if not items:
            return []
        try:
            await caller.call(step.deliver_batch, items)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - all the batch's items fail, recorded
            error = self._timeout_text(exc, caller) or describe_error(exc)
            for item in items:
                self._end_item(item, Outcome.FAILED, bound.id, error, item.data)
            return []
        kept = []
        for item in items:
            item.steps = {**item.steps, bound.id: item.data}
            if not self._delivered(item, bound, batch=True):
                kept.append(item)
        if self.progress is not None:
            self.progress(bound.id, len(items), len(items))
        return kept

    @staticmethod
    def _timeout_text(exc: BaseException, caller: Caller) -> str | None:
        if isinstance(exc, TimeoutError) and caller.timeout is not None:
            return f"timed out after {caller.timeout.total_seconds():g}s"
        return None

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
        for bound in self.workflow.on_failure:
            step = self._make_step(bound)
            caller = self._caller(bound)
            attempt_id, started = self._step_started(bound, 1)
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
            self._step_finished(
                bound,
                attempt_id,
                started,
                status=outcome,
                error=problem,
                items_in=1,
                items_out=1 if outcome == StepStatus.SUCCEEDED else 0,
                retries=caller.retries,
                summary=None,
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
