"""A dry run: the real pipeline and drivers, with a recorder that writes nothing and sends nothing.

``automator run FILE --dry-run`` goes through the same chunks, the same drivers, the same
key rendering and the same "already delivered" check as a run does, so what it counts is
what a run would do. Three things differ, each in one place here:

- :class:`DryRecorder` keeps a run's bookkeeping (step records, counts) in memory and
  writes nothing to the history, emits no plugin event; its ledger reads the history
  (which keys a run delivered) and keeps the dry run's own items in memory;
- a step that can say what it would send (``estimate_item(item)``, a model step) is
  asked that instead of being called: :class:`EstimateDriver` adds up its numbers, and
  the item goes on unchanged (the answer is unknown);
- a deliver step is never called: :class:`CountingDeliverDriver` counts what it would
  deliver, and the item goes on as if it were delivered.

Every other step (fetch, template and validate steps) runs for real: they only read,
and without them filtered or invalid items would be counted as sent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

from automator.engine.calls import Caller, describe_error
from automator.engine.context import RunContext
from automator.engine.drivers import ItemDriver, item_driver
from automator.engine.groups import GroupDeliverDriver
from automator.engine.pipeline import Pipeline, Stop
from automator.engine.recorder import Ending, Recorder, StepRecord
from automator.errors import ItemSignal, StepError
from automator.history.ledger import Ledger
from automator.history.rows import ChunkRow
from automator.history.states import Outcome, RunStatus, StepStatus
from automator.history.store import History
from automator.plugins.events import RunInfo
from automator.plugins.manager import Plugins
from automator.plugins.steps import Item, Phase, Shape, Step
from automator.spec.loader import BoundStep, Workflow

log = logging.getLogger("automator.engine")
DRY_RUN_ID = 0  # no run has it: the history's ids start at 1


@runtime_checkable
class EstimatingStep(Protocol):
    """A step that can say what it would send for an item without sending it (a model step).

    ``estimate_item`` returns ``input_tokens``, ``max_output_tokens``, ``cached`` (the
    answer is in the response cache) and ``max_cost_usd``; it raises an ItemSignal or a
    StepError for an item that would not be sent (too long, say).
    """

    def estimate_item(self, item: Item) -> Mapping[str, Any]: ...


@dataclass
class StepEstimate:
    """What one model step would send, summed over the items that reach it."""

    step_id: str
    model: str
    items: int = 0
    cache_hits: int = 0
    input_tokens: int = 0
    max_output_tokens: int = 0
    max_cost_usd: Decimal = Decimal(0)
    not_sent: dict[str, int] = field(default_factory=dict)  # reason -> items

    def as_json(self) -> dict[str, Any]:
        return {
            "step": self.step_id,
            "model": self.model,
            "items": self.items,
            "cache_hits": self.cache_hits,
            "input_tokens": self.input_tokens,
            "max_output_tokens": self.max_output_tokens,
            "max_cost_usd": str(self.max_cost_usd),
            "not_sent": self.not_sent,
        }


# -- the recorder ---------------------------------------------------------------------------


class DryLedger(Ledger):
    """The ledger as a dry run sees it: which keys runs delivered comes from the history;
    the dry run's own items (for duplicate keys within the run) are kept in memory."""

    def __init__(self, history: History) -> None:
        super().__init__(history)
        self._first_seq: dict[str, int] = {}
        self.already_delivered = 0  # items the pipeline skips because a run delivered their key

    def add_items(self, items: Sequence[Item]) -> None:
        for item in items:
            if item.key is not None:
                self._first_seq.setdefault(item.key, item.seq)

    def repeats(
        self, run_id: int, workflow: str, keys: Sequence[str], *, delivered: bool
    ) -> tuple[dict[str, int], dict[str, int]]:
        by_run, _ = super().repeats(run_id, workflow, keys, delivered=delivered)
        # the pipeline skips exactly the items whose key is in ``by_run`` (one per key given)
        self.already_delivered += sum(1 for key in keys if key in by_run)
        return by_run, {key: self._first_seq[key] for key in keys if key in self._first_seq}


class DryRecorder(Recorder):
    """A recorder that keeps the run's bookkeeping in memory: no history write, no plugin event."""

    def __init__(self, history: History, plugins: Plugins, context: RunContext) -> None:
        super().__init__(history, plugins, context, owner="dry-run")
        self.ledger: DryLedger = DryLedger(history)
        self._row_ids = itertools.count(-1, -1)  # never a real row's id

    async def chunk_fetched(self, chunk: ChunkRow, items: Sequence[Item], parents: Sequence[Ending] = ()) -> None:
        self.ledger.add_items(items)
        self.counts["fetched"] += len(items)
        for parent in parents:
            parent.recorded = True
        self._count(parents)

    async def claim(self, chunk: ChunkRow) -> bool:
        return True  # a dry run resumes nothing; nobody else holds its chunks

    async def sending(self, bound: BoundStep, items: Sequence[Item], group_key: str | None = None) -> None:
        return None

    async def passed(self, bound: BoundStep, items: Sequence[Item], passed: dict[int, list[str]]) -> None:
        for item in items:
            passed.setdefault(item.seq, []).append(bound.id)

    async def ended(self, endings: Sequence[Ending]) -> None:
        self._count(endings)

    async def chunk_done(self, chunk: ChunkRow, endings: Sequence[Ending]) -> None:
        self._count([e for e in endings if not e.recorded])

    def _count(self, endings: Sequence[Ending]) -> None:
        for e in endings:
            self.counts[e.outcome] += 1
            if e.outcome == Outcome.FAILED and self.first_failure is None:
                self.first_failure = (e.step_id or "", self.context.redactor.text(e.reason) or "")

    async def step_started(self, record: StepRecord, items_in: int = 0) -> int:
        # the drivers wait on ``opening`` and key open steps by row id: kept, with a made-up id
        if record.opening is None:
            record.opening = asyncio.get_running_loop().create_future()
            record.row_id = next(self._row_ids)
            record.started = time.monotonic()
            self.open_steps[record.row_id] = record
            record.opening.set_result(record.row_id)
        return await asyncio.shield(record.opening)

    async def step_finished(
        self, record: StepRecord, *, status: StepStatus, error: str | None, retries: int, summary: str | None
    ) -> None:
        self._step_end(record, status=status, error=error, retries=retries, summary=summary)

    def step_failed_soon(self, record: StepRecord, *, error: str, retries: int) -> None:
        self._step_end(record, status=StepStatus.FAILED, error=error, retries=retries, summary=None)

    async def heartbeat(self) -> None:
        return None

    async def run_finished(self, status: RunStatus, error: str | None, error_step: str | None, duration: float) -> None:
        return None


# -- the drivers ----------------------------------------------------------------------------


def _reason(step: Step[Any], exc: ItemSignal | StepError) -> str:
    text = exc.reason if isinstance(exc, ItemSignal) else exc.message
    # secrets out before the cut: part of a secret would not be recognised
    return (step.context.redactor.text(text) or "").split(":")[0][:80]


class EstimateDriver(ItemDriver):
    """A model step in a dry run: what each item would send is counted; nothing is sent.

    The item goes on unchanged (the answer is unknown); an item the step would not send
    (too long for the context, say) ends as the step would end it.
    """

    shape = Shape.BATCH_TRANSFORM  # a chunk per call: there is nothing to wait for

    def __init__(self, bound: BoundStep, step: Step[Any], caller: Caller, recorder: Recorder, *, last: bool) -> None:
        super().__init__(bound, step, caller, recorder, last=last)
        self.found = StepEstimate(bound.id, str(getattr(step.config, "model", "?")))

    async def chunk(self, items: list[Item], passed: dict[int, list[str]]) -> list[Ending | None]:
        assert isinstance(self.step, EstimatingStep)
        found = self.found
        results: list[Ending | None] = []
        for item in items:
            try:
                numbers = self.step.estimate_item(item)
            except (ItemSignal, StepError) as exc:
                reason = _reason(self.step, exc)
                found.not_sent[reason] = found.not_sent.get(reason, 0) + 1
                results.append(self._signal(item, exc))
                continue
            found.items += 1
            found.cache_hits += int(bool(numbers["cached"]))
            if not numbers["cached"]:
                found.input_tokens += numbers["input_tokens"]
                found.max_output_tokens += numbers["max_output_tokens"]
            found.max_cost_usd += numbers["max_cost_usd"]
            results.append(None)
        return results


class CountingDeliverDriver(ItemDriver):
    """A deliver step in a dry run: never called; the items it would deliver are counted and go on."""

    shape = Shape.BATCH_DELIVER

    def __init__(self, bound: BoundStep, step: Step[Any], caller: Caller, recorder: Recorder, *, last: bool) -> None:
        super().__init__(bound, step, caller, recorder, last=last)
        self.would_deliver = 0

    async def chunk(self, items: list[Item], passed: dict[int, list[str]]) -> list[Ending | None]:
        self.would_deliver += len(items)
        for item in items:
            self._took(item, None)
        # as after a delivery: a later step sees the item, the pipeline ends it delivered
        await self.recorder.passed(self.bound, items, passed)
        return [None] * len(items)


class CountingGroupDriver(GroupDeliverDriver):
    """A deliver step with ``group:`` in a dry run: the groups form as in a run and are counted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.would_deliver = 0
        self.digests = 0

    async def _deliver_group(self, group: Any) -> dict[int, Ending | None]:
        self.digests += 1
        self.would_deliver += len(group.members)
        for item, chunk in group.members:
            self._took(item, None)
            await self.recorder.passed(self.bound, [item], chunk.passed)
        return {item.seq: None for item, _ in group.members}


def dry_driver(bound: BoundStep, step: Step[Any], caller: Caller, recorder: Recorder, *, last: bool) -> ItemDriver:
    """The driver factory of a dry run (``Pipeline(make_driver=...)``)."""
    if bound.phase is Phase.DELIVER:
        if bound.spec.group is not None:
            return CountingGroupDriver(bound, step, caller, recorder, last=last)
        return CountingDeliverDriver(bound, step, caller, recorder, last=last)
    if isinstance(step, EstimatingStep):
        return EstimateDriver(bound, step, caller, recorder, last=last)
    return item_driver(bound, step, caller, recorder, last=last)


# -- the dry run ----------------------------------------------------------------------------


@dataclass
class DryRun:
    """What a dry run counted."""

    counts: dict[str, int]  # fetched, and each outcome the items would end in
    already_delivered: int  # items skipped because a run delivered their key
    model_steps: list[StepEstimate]  # in the workflow's order
    deliveries: dict[str, int]  # deliver step -> items it would deliver
    digests: dict[str, int]  # deliver step with group: -> the deliveries (groups) it would make
    stop: Stop | None  # why the run would stop (a fetch failed, say), or None


async def run_dry(workflow: Workflow, history: History, plugins: Plugins, params: dict[str, Any]) -> DryRun:
    """Run the workflow through the real pipeline, sending nothing and writing nothing.

    ``params``: the run's parameters, resolved (defaults applied).
    """
    info = RunInfo(DRY_RUN_ID, workflow.name, "dry-run", datetime.now(UTC), workflow.version)
    context = RunContext(workflow, plugins, history, info, params)
    recorder = DryRecorder(history, plugins, context)
    steps = {b.id: b.type(b.config, context, b.id) for b in workflow.steps}
    try:
        pipeline = Pipeline(workflow, recorder, steps, make_driver=dry_driver)
        await pipeline.run()
    finally:
        await _close(workflow, steps)
    drivers = [pipeline.drivers.get(b.id) for b in workflow.steps]
    stop = pipeline.stop
    if stop is not None:
        stop = Stop(context.redactor.text(stop.error) or "", stop.step_id)
    return DryRun(
        counts=dict(recorder.counts),
        already_delivered=recorder.ledger.already_delivered,
        model_steps=[d.found for d in drivers if isinstance(d, EstimateDriver)],
        deliveries={
            d.bound.id: d.would_deliver for d in drivers if isinstance(d, CountingDeliverDriver | CountingGroupDriver)
        },
        digests={d.bound.id: d.digests for d in drivers if isinstance(d, CountingGroupDriver)},
        stop=stop,
    )


async def _close(workflow: Workflow, steps: dict[str, Step[Any]]) -> None:
    """Each step's close(), once, in order, as a run does; never a deliver step's: its
    close() may finish a delivery (file.deliver assembles its file there)."""
    for bound in workflow.steps:
        if bound.phase is Phase.DELIVER:
            continue
        try:
            await steps[bound.id].close()
        except Exception as exc:  # noqa: BLE001 - as in a run: logged, the counts stand
            log.warning("step %s: close() failed: %s", bound.id, describe_error(exc))


__all__ = [
    "DRY_RUN_ID",
    "CountingDeliverDriver",
    "CountingGroupDriver",
    "DryLedger",
    "DryRecorder",
    "DryRun",
    "EstimateDriver",
    "EstimatingStep",
    "StepEstimate",
    "dry_driver",
    "run_dry",
]
