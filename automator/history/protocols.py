"""What the rest of automator may ask of the run history: four small storage interfaces.

The engine, the daemon, the command line and the model-call service speak to these, never
to SQL. The one implementation is SQLAlchemy's: :class:`~automator.history.store.History`
(runs and the ledger), :class:`~automator.history.model_calls.ModelCallHistory` (model calls)
and :class:`~automator.history.daemon_store.DaemonStore` (the daemon's state); the
``TYPE_CHECKING`` block at the end has mypy check that each one fits.

Each protocol lists exactly the methods used outside ``automator.history``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from automator.history.daemon_models import TriggerRequest
    from automator.history.llm_models import ModelBatch
    from automator.history.model_calls import CallUsage
    from automator.history.models import LedgerItem, Run
    from automator.history.rows import ChunkRow, ItemRow, OutcomeRow
    from automator.history.states import RequestStatus, RunStatus, StepStatus
    from automator.history.store import UnfinishedRun


class RunStore(Protocol):
    """Runs and the attempts of their steps."""

    def start_run(
        self,
        *,
        workflow: str,
        version: str,
        path: str | None,
        trigger: str,
        params: dict[str, Any] | None = None,
        scheduled_for: datetime | None = None,
        owner: str | None = None,
    ) -> Run:
        """Record a new run, ``running``, and return it (with its id)."""
        ...

    def update_counts(self, run_id: int, counts: dict[str, int]) -> None:
        """Store the run's item counts so far (and stamp it as alive)."""
        ...

    def finish_run(
        self, run_id: int, *, status: RunStatus, error: str | None, error_step: str | None, counts: dict[str, int]
    ) -> None:
        """Record how a run ended, with its final counts."""
        ...

    def start_step(self, run_id: int, *, step_id: str, step_type: str, phase: str, attempt: int, items_in: int) -> int:
        """Record a step attempt starting; its row id."""
        ...

    def finish_step(
        self,
        attempt_id: int,
        *,
        status: StepStatus,
        error: str | None = None,
        items_out: int = 0,
        retries: int = 0,
        summary: str | None = None,
    ) -> None:
        """Record how a step attempt ended."""
        ...

    async def step_started(
        self, run_id: int, *, step_id: str, step_type: str, phase: str, attempt: int, items_in: int
    ) -> int:
        """A step attempt starting, in a shared commit off the event loop; its row id once durable."""
        ...

    def step_finished_soon(self, attempt_id: int, **fields: Any) -> None:
        """A step attempt's end, queued in order with the other writes, not waited for."""
        ...

    async def step_finished(self, attempt_id: int, **fields: Any) -> None:
        """A step attempt's end, in a shared commit."""
        ...

    async def run_finished(
        self, run_id: int, *, status: str, error: str | None, error_step: str | None, counts: dict[str, int]
    ) -> None:
        """The run's end, in a shared commit after the writes queued before it."""
        ...

    async def save_counts(self, run_id: int, counts: dict[str, int]) -> None:
        """The run's counts so far (and a heartbeat), in a shared commit."""
        ...

    @property
    def ledger(self) -> WriteAheadLedger:
        """The chunks and items of runs, written ahead while a run goes on."""
        ...

    def unfinished_runs(self, workflow: str | None = None) -> list[UnfinishedRun]:
        """Runs not ended: ``running``, or ``crashed`` and neither resumed nor failed yet."""
        ...

    def take_crashed_run(self, run_id: int, *, previous_owner: str | None, owner: str) -> bool:
        """A crashed, undecided run becomes ``owner``'s to resume or fail; False if another got it."""
        ...

    def close_open_steps(self, run_id: int, *, status: StepStatus, error: str) -> int:
        """End the run's step rows still ``running`` (their process is gone); how many there were."""
        ...

    def list_runs(self, *, workflow: str | None = None, status: str | None = None, limit: int = 20) -> list[Run]:
        """The newest runs, optionally of one workflow or with one status."""
        ...

    def get_run(self, run_id: int) -> Run | None:
        """One run with its step attempts, or None."""
        ...

    @property
    def model_calls(self) -> ModelCallStore:
        """The model calls of the runs (crash recovery confirms the ones a crash lost)."""
        ...

    def model_usage_by_attempt(self, run_id: int) -> dict[int, dict[str, Any]]:
        """Per step attempt row: the calls, tokens and cost of the model calls it made."""
        ...

    def close(self) -> None:
        """Release the database connections."""
        ...


class LedgerStore(Protocol):
    """The item ledger: every item a fetch produced, and its one outcome."""

    def add_items(self, run_id: int, workflow: str, rows: Sequence[ItemRow]) -> None:
        """Record fetched items, ``pending``."""
        ...

    def set_outcomes(self, run_id: int, rows: Iterable[OutcomeRow]) -> None:
        """Record items' outcomes (and the step that decided, the reason, the result)."""
        ...

    def set_delivered_by(self, run_id: int, rows: Iterable[tuple[int, list[str]]]) -> None:
        """Record which deliver steps items passed (items still pending, in a longer workflow)."""
        ...

    def delivered_keys(self, workflow: str, keys: Iterable[str], *, other_than: int | None = None) -> dict[str, int]:
        """Which of ``keys`` a run of ``workflow`` (not ``other_than``) delivered, and in which run."""
        ...

    def items(self, run_id: int, outcomes: Sequence[str] | None = None) -> list[LedgerItem]:
        """A run's ledger rows in fetch order, optionally only those with some outcomes."""
        ...


class WriteAheadLedger(Protocol):
    """A run's chunks and items while it goes on: each async method returns once its write is
    durable (concurrent writes share a commit); a chunk is held by one owner at a time."""

    async def add_chunk(
        self,
        run_id: int,
        workflow: str,
        chunk: ChunkRow,
        items: Sequence[ItemRow],
        lease: timedelta,
        ended: Sequence[OutcomeRow] = (),
    ) -> None:
        """A new chunk and its items, ``pending``, held by ``chunk.owner`` for ``lease``; with
        ``ended``'s outcomes in the same transaction."""
        ...

    async def claim(self, run_id: int, seq: int, owner: str, lease: timedelta) -> bool:
        """Take an open chunk whose lease is free or over; False (and nothing done) otherwise."""
        ...

    async def renew(self, run_id: int, owner: str, lease: timedelta) -> None:
        """Extend the leases ``owner`` holds on the run's open chunks."""
        ...

    async def release(self, run_id: int, owner: str | None = None) -> int:
        """End the leases on the run's open chunks (of a dead owner); how many."""
        ...

    async def cover(self, run_id: int, size: int) -> int:
        """Chunks for pending items no chunk holds (a run recorded before chunks); how many made."""
        ...

    async def sending(self, run_id: int, step_id: str, seqs: Sequence[int], group_key: str | None = None) -> None:
        """A delivery's intent: these items are on their way by ``step_id`` (as one digest, with a key)."""
        ...

    async def passed(self, run_id: int, rows: Sequence[tuple[int, list[str]]]) -> None:
        """A delivery's result for items still pending: the deliver steps each has passed."""
        ...

    async def ended(self, run_id: int, rows: Sequence[OutcomeRow]) -> None:
        """Items' outcomes."""
        ...

    async def finish_chunk(self, run_id: int, seq: int, rows: Sequence[OutcomeRow]) -> None:
        """A chunk's last outcomes and its end, in one transaction."""
        ...

    def counts(self, run_id: int) -> dict[str, int]:
        """``fetched`` and how many items ended each way."""
        ...

    def open_chunks(self, run_id: int) -> list[ChunkRow]:
        """The run's chunks not done, in order."""
        ...

    def chunk_rows(self, run_id: int) -> list[ChunkRow]:
        """Every chunk of the run, in order."""
        ...

    def chunk_items(self, run_id: int, chunk: ChunkRow) -> list[Any]:
        """A chunk's pending items: (seq, key, data, delivered_by, sending, group_key)."""
        ...

    def finished_steps(self, run_id: int) -> set[str]:
        """The run's steps with an attempt that succeeded (a fetch that got to its end)."""
        ...

    def repeats(
        self, run_id: int, workflow: str, keys: Sequence[str], *, delivered: bool
    ) -> tuple[dict[str, int], dict[str, int]]:
        """For a new chunk's keys: the run that delivered each (if asked), and this run's first item with each."""
        ...


class ModelCallStore(Protocol):
    """Model calls, batch jobs, the response cache and what the calls cost."""

    def write_calls(self, calls: Sequence[dict[str, Any]], cache: Sequence[dict[str, Any]]) -> None:
        """Model call rows and new response-cache entries, in one transaction."""
        ...

    def cached_response(self, key: str, *, count_hit: bool = True) -> dict[str, Any] | None:
        """The stored answer to an identical request (counting the hit), or None."""
        ...

    async def lookup(self, key: str, *, run_id: int | None = None) -> dict[str, Any] | None:
        """As ``cached_response``, in a shared commit; ``run_id``: only an answer that run paid for."""
        ...

    async def call_sent(self, **fields: Any) -> int:
        """A call's row, ``sent``, durable before its request leaves; its id."""
        ...

    async def call_ended(self, call_id: int | None, fields: dict[str, Any], cache: dict[str, Any] | None = None) -> int:
        """A call's result (and its answer's cache entry) durable in one commit; the row's id."""
        ...

    async def store_answer(self, cache: dict[str, Any]) -> None:
        """An answer into the response cache, durable (kept if one is there already)."""
        ...

    def confirm_lost(self, run_id: int, *, step_id: str | None = None) -> int:
        """The run's ``sent`` calls become ``unconfirmed`` at their upper bound; how many."""
        ...

    def add_batch(self, **fields: Any) -> int:
        """Record a batch job; its row id."""
        ...

    def update_batch(self, row_id: int, **fields: Any) -> None:
        """Change a batch job's row (provider id, status, error)."""
        ...

    def run_batches(self, run_id: int, step_id: str) -> list[ModelBatch]:
        """The batch jobs one step of one run submitted, collected or not."""
        ...

    def last_calls(self, run_id: int, step_id: str) -> dict[int, tuple[str, str | None]]:
        """Each item's latest model call in one step of one run: (status, error)."""
        ...

    def spent_since(self, workflow: str, since: datetime) -> Decimal:
        """What a workflow's model calls cost since a moment."""
        ...

    def cost_rows(self, since: datetime, by: str) -> list[tuple[Any, ...]]:
        """Spend since a moment per workflow, day or step: group, calls, hits, tokens, cost, unconfirmed bound."""
        ...

    def last_call_id(self) -> int:
        """The newest model call's id (0 when there is none)."""
        ...

    def calls_after(self, call_id: int, *, limit: int = 10000, also: Sequence[int] = ()) -> list[CallUsage]:
        """The model calls recorded after ``call_id`` (and the ones ``also`` names), oldest first."""
        ...

    def delivered_prompts(self, workflow: str, step_id: str) -> list[tuple[Any, Any]]:
        """(prompt, response) of a step's answered calls whose item was delivered."""
        ...


class SchedulerStore(Protocol):
    """The daemon's state: schedule fires, trigger requests, run ownership, recovery, pruning."""

    def register(self, workflow: str, schedule: str) -> datetime:
        """Make sure the workflow has a schedule state row; when it was first registered."""
        ...

    def last_fires(self) -> dict[str, tuple[datetime | None, datetime]]:
        """Per workflow: (last fire handled, registered at)."""
        ...

    def last_scheduled_run(self, workflow: str) -> datetime | None:
        """The newest ``scheduled_for`` among the workflow's scheduled runs."""
        ...

    def save_fires(self, fires: dict[str, datetime]) -> None:
        """Remember the last fire handled per workflow."""
        ...

    def record_skipped(
        self,
        *,
        workflow: str,
        version: str,
        path: str,
        trigger: str,
        scheduled_for: datetime | None,
        reason: str,
        owner: str,
    ) -> int:
        """Record a fire that did not run as a ``skipped`` run; its id."""
        ...

    def heartbeat(self, run_ids: Sequence[int]) -> None:
        """Stamp the runs this process executes as alive (the lease of their owner)."""
        ...

    def mark_crashed(self, run_id: int, owner: str | None, *, detected_by: str, reason: str) -> bool:
        """running → crashed unless someone got there first; records the recovery."""
        ...

    def claim_for_resume(self, run_id: int, owner: str) -> bool:
        """crashed → running under ``owner``, atomically."""
        ...

    def end_run(self, run_id: int, *, status: RunStatus, reason: str, by: str | None = None) -> None:
        """Close a run its process could not close: pending items fail, counts are recounted."""
        ...

    def recoveries(self, run_id: int) -> list[tuple[str, str | None]]:
        """What recovery did to a run, oldest first: (action, reason)."""
        ...

    def request_trigger(self, workflow: str, params: dict[str, Any]) -> int:
        """Queue a manual run for a daemon; the request's id."""
        ...

    def pending_requests(self) -> list[TriggerRequest]:
        """Trigger requests no daemon has claimed yet, oldest first."""
        ...

    def claim_request(self, request_id: int, owner: str) -> bool:
        """pending → claimed by ``owner``; False when someone got there first."""
        ...

    def settle_request(
        self, request_id: int, *, status: RequestStatus, run_id: int | None = None, error: str | None = None
    ) -> None:
        """Record how a claimed request ended."""
        ...

    def get_request(self, request_id: int) -> TriggerRequest | None:
        """One trigger request, or None."""
        ...

    def cancel_request(self, request_id: int) -> bool:
        """pending → cancelled; False when a daemon claimed it meanwhile."""
        ...

    def prune_runs(self, *, finished_before: datetime, after_id: int, limit: int) -> tuple[int | None, int]:
        """Remove up to ``limit`` old runs after ``after_id``: (last id looked at or None, runs deleted)."""
        ...

    def prune_unattached(self, *, before: datetime) -> None:
        """Remove old model calls made outside any run, and old trigger requests."""
        ...

    def ping(self) -> None:
        """Raise a HistoryError if the database cannot be reached."""
        ...


if TYPE_CHECKING:
    # mypy checks here that the SQLAlchemy classes implement the protocols
    from automator.history.daemon_store import DaemonStore
    from automator.history.model_calls import ModelCallHistory
    from automator.history.store import History

    def _history_is_a_run_store(history: History) -> RunStore:
        return history

    def _history_is_a_ledger_store(history: History) -> LedgerStore:
        return history

    def _ledger_is_a_write_ahead_ledger(history: History) -> WriteAheadLedger:
        return history.ledger

    def _model_calls_are_a_model_call_store(calls: ModelCallHistory) -> ModelCallStore:
        return calls

    def _daemon_store_is_a_scheduler_store(store: DaemonStore) -> SchedulerStore:
        return store
