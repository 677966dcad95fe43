"""The one funnel for a run's state: every change is written ahead, then announced.

Nothing else in the engine writes the history or emits a plugin event. Each method
returns once its write is durable (the history's group commit: concurrent items share a
transaction, and the event loop never waits on the database), then tells the plugins.
The order of a side effect is therefore always: intent durable → the call leaves →
result durable → the item moves on (see :mod:`automator.history.ledger`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from automator.engine.context import RunContext
from automator.errors import HistoryError
from automator.history.protocols import RunStore
from automator.history.rows import ChunkRow, ItemRow, OutcomeRow
from automator.history.states import ChunkStatus, Outcome, RunStatus, StepStatus
from automator.plugins.events import ItemOutcome, RunFinished, StepFinished, StepStarted
from automator.plugins.manager import Plugins
from automator.plugins.steps import Item
from automator.spec.loader import BoundStep

log = logging.getLogger("automator.engine")
# a chunk's lease outlives a few missed heartbeats; a resumed run takes the chunks of a
# process known dead at once (recovery releases them), a worker only after the lease
LEASE = timedelta(minutes=5)


@dataclass
class Ending:
    """An item's outcome, decided by a driver, not yet recorded."""

    item: Item
    outcome: Outcome
    step_id: str | None
    reason: str | None
    result: Any = None
    recorded: bool = False  # written already (a delivery's result): the chunk's end skips it
    children: list[Any] | None = None  # a transform's list: the items this one becomes (a split)


@dataclass
class StepRecord:
    """One step attempt row while the run goes on: its counts, written when it ends."""

    bound: BoundStep
    attempt: int = 1
    row_id: int | None = None
    started: float = 0.0
    items_in: int = 0
    items_out: int = 0
    opening: asyncio.Future[int] | None = None
    finished: bool = False
    summary: str | None = None


class Recorder:
    """Writes one run's state through the history's write-ahead ledger and announces it."""

    def __init__(self, history: RunStore, plugins: Plugins, context: RunContext, owner: str) -> None:
        self.history = history
        self.ledger = history.ledger
        self.plugins = plugins
        self.context = context
        self.owner = owner
        self.run_id = context.run_id
        self.workflow = context.workflow.name
        self.counts = {"fetched": 0, "delivered": 0, "skipped": 0, "quarantined": 0, "failed": 0}
        self.first_failure: tuple[str, str] | None = None
        self._item_events = plugins.wants_item_events  # asked once: it is per item otherwise
        self.steps: dict[str, StepRecord] = {}
        self.open_steps: dict[int, StepRecord] = {}
        # items of live chunks whose outcome is written (or queued) already: kept per chunk
        self.outcome_queued: set[int] = set()

    # -- chunks and items ----------------------------------------------------------------

    async def chunk_fetched(self, chunk: ChunkRow, items: Sequence[Item], parents: Sequence[Ending] = ()) -> None:
        """A new chunk and its items, ``pending`` and held by this process, before any step sees them.

        ``parents``: the items a transform split into these, whose ends are written in the same
        transaction (a crash leaves either the parents pending or their children in the ledger).
        """
        redact = self.context.redactor.data
        rows = [ItemRow(i.seq, i.key, chunk.fetched_by, redact(i.data)) for i in items]
        ended = [self.ending_row(parent) for parent in parents]
        await self.ledger.add_chunk(self.run_id, self.workflow, chunk, rows, LEASE, ended)
        self.counts["fetched"] += len(items)
        for parent in parents:
            parent.recorded = True
        self._announce(parents)

    async def claim(self, chunk: ChunkRow) -> bool:
        """Take an open chunk of a resumed run; False if another process holds it."""
        return await self.ledger.claim(self.run_id, chunk.seq, self.owner, LEASE)

    async def sending(self, bound: BoundStep, items: Sequence[Item], group_key: str | None = None) -> None:
        """The intent of a delivery, durable before it leaves (of a digest: with the group's key)."""
        await self.ledger.sending(self.run_id, bound.id, [i.seq for i in items], group_key)

    async def passed(self, bound: BoundStep, items: Sequence[Item], passed: dict[int, list[str]]) -> None:
        """A delivery's result for items a later step still works on: they will not be sent again."""
        rows = []
        for item in items:
            steps = passed.setdefault(item.seq, [])
            steps.append(bound.id)
            rows.append((item.seq, list(steps)))
        await self.ledger.passed(self.run_id, rows)

    def ending_row(self, ending: Ending) -> OutcomeRow:
        redactor = self.context.redactor
        return OutcomeRow(
            ending.item.seq,
            ending.outcome,
            ending.step_id,
            redactor.text(ending.reason),
            redactor.data(ending.result),
        )

    async def ended(self, endings: Sequence[Ending]) -> None:
        """Outcomes that must be durable now (a delivery's result): written, then announced.

        Once queued the write is done even if the run is cancelled while it waits (a timeout):
        the items count as ended then too, so the run's end does not fail them afterwards.
        """
        if not endings:
            return
        self.outcome_queued.update(e.item.seq for e in endings)
        try:
            await self.ledger.ended(self.run_id, [self.ending_row(e) for e in endings])
        except asyncio.CancelledError:
            self._announce(endings)
            raise
        self._announce(endings)

    async def chunk_done(self, chunk: ChunkRow, endings: Sequence[Ending]) -> None:
        """The chunk's remaining outcomes and its end, in one transaction."""
        fresh = [e for e in endings if not e.recorded and e.item.seq not in self.outcome_queued]
        await self.ledger.finish_chunk(self.run_id, chunk.seq, [self.ending_row(e) for e in fresh])
        self._announce(fresh)
        self.outcome_queued.difference_update(range(chunk.first, chunk.first + chunk.size))

    def _announce(self, endings: Sequence[Ending]) -> None:
        redactor = self.context.redactor
        for e in endings:
            self.counts[e.outcome] += 1
            if e.outcome == Outcome.FAILED and self.first_failure is None:
                self.first_failure = (e.step_id or "", redactor.text(e.reason) or "")
        if self._item_events:
            info = self.context.info
            for e in endings:
                data = redactor.data(e.item.data)  # listeners may log or post it: no secrets
                self.plugins.item_outcome(
                    ItemOutcome(info, e.item.seq, e.item.key, e.outcome, e.step_id, redactor.text(e.reason), data)
                )

    # -- steps ---------------------------------------------------------------------------

    def step(self, bound: BoundStep) -> StepRecord:
        record = self.steps.get(bound.id)
        if record is None:
            record = self.steps[bound.id] = StepRecord(bound)
        return record

    async def step_started(self, record: StepRecord, items_in: int = 0) -> int:
        """The step's row, written once (the first chunk to reach the step writes it; the others wait)."""
        if record.opening is None:
            record.opening = asyncio.get_running_loop().create_future()
            bound = record.bound
            self.plugins.step_started(
                StepStarted(self.context.info, bound.id, bound.type.name, str(bound.phase), items_in)
            )
            try:
                row_id = await self.history.step_started(
                    self.run_id,
                    step_id=bound.id,
                    step_type=bound.type.name,
                    phase=str(bound.phase),
                    attempt=record.attempt,
                    items_in=items_in,
                )
            except BaseException as exc:
                record.opening.set_exception(exc)
                record.opening.exception()  # retrieved: the waiters see it too
                raise
            record.row_id = row_id
            record.started = time.monotonic()
            self.open_steps[row_id] = record
            record.opening.set_result(row_id)
            return row_id
        return await asyncio.shield(record.opening)

    async def step_finished(
        self, record: StepRecord, *, status: StepStatus, error: str | None, retries: int, summary: str | None
    ) -> None:
        """The step's row ends, with its counts; then the plugins hear it."""
        fields = self._step_end(record, status=status, error=error, retries=retries, summary=summary)
        if fields is not None:
            await self.history.step_finished(record.row_id or 0, **fields)
            self._step_end_event(record, fields)

    def step_failed_soon(self, record: StepRecord, *, error: str, retries: int) -> None:
        """A failed try of a fetch, from the retry's callback (not a coroutine): its row's end is
        queued (written in order with the rest), not waited for."""
        fields = self._step_end(record, status=StepStatus.FAILED, error=error, retries=retries, summary=None)
        if fields is not None:
            self.history.step_finished_soon(record.row_id or 0, **fields)
            self._step_end_event(record, fields)

    def _step_end(
        self, record: StepRecord, *, status: StepStatus, error: str | None, retries: int, summary: str | None
    ) -> dict[str, Any] | None:
        if record.row_id is None or record.finished:
            return None
        record.finished = True
        self.open_steps.pop(record.row_id, None)
        redact = self.context.redactor.text
        return {
            "status": status,
            "error": redact(error),
            "items_in": record.items_in,
            "items_out": record.items_out,
            "retries": retries,
            "summary": redact(summary),
        }

    def _step_end_event(self, record: StepRecord, fields: dict[str, Any]) -> None:
        bound = record.bound
        self.plugins.step_finished(
            StepFinished(
                self.context.info,
                bound.id,
                bound.type.name,
                str(bound.phase),
                fields["status"],
                fields["error"],
                record.items_in,
                record.items_out,
                time.monotonic() - record.started,
            )
        )

    def new_attempt(self, record: StepRecord) -> StepRecord:
        """A fetch step tried again: its next attempt gets a row of its own."""
        fresh = StepRecord(record.bound, attempt=record.attempt + 1)
        self.steps[record.bound.id] = fresh
        return fresh

    # -- the run -------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Counts so far, the run stamped alive, and this process's chunk leases renewed."""
        counts = dict(self.counts)
        await self.history.save_counts(self.run_id, counts)
        await self.ledger.renew(self.run_id, self.owner, LEASE)

    async def run_finished(self, status: RunStatus, error: str | None, error_step: str | None, duration: float) -> None:
        await self.history.run_finished(
            self.run_id, status=status, error=error, error_step=error_step, counts=self.counts
        )
        self.plugins.run_finished(RunFinished(self.context.info, status, error, dict(self.counts), duration))


def log_heartbeat_failure(run_id: int, exc: HistoryError) -> None:
    # a missed beat is not the run's end (the next one tries again)
    log.warning("run %s: heartbeat not recorded: %s", run_id, exc.message)


__all__ = ["LEASE", "ChunkStatus", "Ending", "Recorder", "StepRecord", "log_heartbeat_failure"]
