"""Chunks of items through the item steps, several at once; memory bounded by the chunks in flight.

A fetch's items are cut into chunks as they come (``chunk_size``, a page at most); each
chunk is written to the ledger (held by this process) before any step sees it, then goes
through the item steps while the fetch goes on, at most ``chunks_in_flight`` at a time.
Within a chunk, consecutive per-item steps take each item through all of them before the
next step's batch call, so the first deliveries leave while the model step goes on; a
batch step (a Batch API transform, a file written per chunk) takes the chunk at once.
A chunk ends when all its items have outcomes; a resumed run claims the open ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from automator.engine.drivers import (
    FetchDriver,
    FetchFailed,
    ItemDriver,
    PerItemDriver,
    _RetryNeeded,
    item_driver,
    make_caller,
)
from automator.engine.recorder import Ending, Recorder
from automator.errors import StepError
from automator.history.rows import ChunkRow
from automator.history.states import ChunkStatus, Outcome, StepStatus
from automator.plugins.steps import Item, Phase, Step
from automator.spec.loader import BoundStep, Workflow

ProgressCallback = Callable[[str, int, int], None]
# the driver for a step (``drivers.item_driver``; the dry run passes its own for model and deliver steps)
DriverFactory = Callable[..., ItemDriver]
DEFAULT_CHUNK_SIZE = 100
DEFAULT_CHUNKS_IN_FLIGHT = 4


@dataclass
class Chunk:
    """A chunk at work: its items, the outcomes decided and not yet written, what each passed."""

    row: ChunkRow
    entry: int  # index in the workflow's steps of the first step its items go through
    items: list[Item]
    endings: list[Ending] = field(default_factory=list)
    ended: set[int] = field(default_factory=set)
    passed: dict[int, list[str]] = field(default_factory=dict)  # item seq -> deliver steps it passed
    written: bool = False  # in the ledger (until then its items are not the run's yet)


@dataclass
class Stop:
    error: str
    step_id: str | None


class Pipeline:
    """One run's item flow: fetch drivers feed chunks to the item-step drivers."""

    def __init__(
        self,
        workflow: Workflow,
        recorder: Recorder,
        steps: dict[str, Step[Any]],
        *,
        progress: ProgressCallback | None = None,
        make_driver: DriverFactory = item_driver,
    ) -> None:
        self.workflow = workflow
        self.recorder = recorder
        self.context = recorder.context
        self.steps = steps
        self.progress = progress
        bounds = workflow.steps
        self.drivers: dict[str, ItemDriver] = {
            b.id: make_driver(b, steps[b.id], make_caller(workflow, b), recorder, last=b is bounds[-1])
            for b in bounds
            if b.phase is not Phase.FETCH
        }
        spec = workflow.spec
        asked = [size for s in steps.values() if (size := s.chunk_size) is not None]
        self.chunk_size = spec.chunk_size or max([DEFAULT_CHUNK_SIZE, *asked])
        self.slots = asyncio.Semaphore(spec.chunks_in_flight)
        self.live: dict[int, Chunk] = {}
        self.stop: Stop | None = None
        self.next_chunk = 0
        self.next_seq = 0
        self.resent = 0  # deliveries found in flight in a resumed run: sent again, same key
        self._done: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.has_deliver = any(b.phase is Phase.DELIVER for b in bounds)

    # -- the fetch side ----------------------------------------------------------------

    async def run(self) -> None:
        """Every fetch step in order, its chunks through the item steps, until all are done."""
        try:
            for index, bound in enumerate(self.workflow.steps):
                if bound.phase is not Phase.FETCH or self.stop is not None:
                    continue
                await self._fetch(index, bound)
            await self._drain()
        except BaseException:
            await self._cancel()
            raise

    async def _fetch(self, index: int, bound: BoundStep) -> None:
        driver = FetchDriver(bound, self.steps[bound.id], make_caller(self.workflow, bound), self.recorder)
        pages = driver.pages(self.chunk_size)
        try:
            async for part in pages:
                await self.slots.acquire()  # a chunk is admitted only when one may go: backpressure
                # numbered and keyed here, in fetch order; written (and checked for repeats)
                # by its own task, so the fetch goes on to the next page meanwhile. The
                # history's writes are done in the order they are queued: a chunk's check
                # for repeats sees every chunk before it.
                chunk, endings = self._prepare(bound, index, part)
                self._spawn(chunk, admit=(bound, endings))
                if self.stop is not None:
                    break
        except FetchFailed as failed:
            self.request_stop(failed.error, failed.step_id)
            return
        finally:
            await pages.aclose()
        await driver.finished()

    def _prepare(self, bound: BoundStep, index: int, raw: list[Any]) -> tuple[Chunk, list[Ending]]:
        """Number the items and give them keys (a key that cannot be made fails its item)."""
        first = self.next_seq
        self.next_seq += len(raw)
        items: list[Item] = []
        endings: list[Ending] = []
        for offset, data in enumerate(raw):
            if not isinstance(data, dict):
                data = {"value": data}
            item = Item(seq=first + offset, data=data, steps={bound.id: data})
            if bound.spec.key is not None:
                try:
                    item.key = self.context.render_text(bound.spec.key, item)
                except StepError as exc:
                    endings.append(Ending(item, Outcome.FAILED, bound.id, f"key: {exc.message}"))
            items.append(item)
        row = ChunkRow(self.next_chunk, first, len(items), bound.id, ChunkStatus.OPEN, self.recorder.owner)
        self.next_chunk += 1
        return Chunk(row, index + 1, items), endings

    async def _admit(self, bound: BoundStep, chunk: Chunk, endings: list[Ending]) -> None:
        """Write the chunk before any step sees it, and end repeats (``only_new``)."""
        items = chunk.items
        await self.recorder.chunk_fetched(chunk.row, items)
        chunk.written = True
        for ending in endings:
            self._end(chunk, ending)
        keys = [i.key for i in items if i.key is not None and i.seq not in chunk.ended]
        if bound.only_new and keys:
            ledger, run_id = self.recorder.ledger, self.recorder.run_id
            delivered, firsts = await asyncio.to_thread(
                ledger.repeats, run_id, self.workflow.name, keys, delivered=True
            )
            for item in items:
                if item.key is None or item.seq in chunk.ended:
                    continue
                if item.key in delivered:
                    reason = f"already delivered (key {item.key!r}, run {delivered[item.key]})"
                    self._end(chunk, Ending(item, Outcome.SKIPPED, bound.id, reason))
                elif firsts.get(item.key, item.seq) != item.seq:
                    reason = f"duplicate key {item.key!r} (same as item {firsts[item.key]})"
                    self._end(chunk, Ending(item, Outcome.SKIPPED, bound.id, reason))

    # -- a resumed run ---------------------------------------------------------------------

    async def resume(self, chunks: list[ChunkRow]) -> None:
        """The open chunks of a run whose process died: claimed, their pending items through the rest.

        Items restart after their fetch, from the data the ledger keeps, and pass by the
        deliver steps they reached already; an item whose delivery was in flight is sent
        again (same idempotency key). A pending item whose key another run delivered
        since is skipped before any step sees it.
        """
        index_of = {b.id: i for i, b in enumerate(self.workflow.steps)}
        fetchers = {b.id: b for b in self.workflow.steps if b.phase is Phase.FETCH}
        ledger, run_id = self.recorder.ledger, self.recorder.run_id
        try:
            for row in chunks:
                if self.stop is not None:
                    break
                await self.slots.acquire()
                try:
                    if not await self.recorder.claim(row):
                        self.slots.release()
                        continue
                    rows = await asyncio.to_thread(ledger.chunk_items, run_id, row)
                    chunk = self._restored(row, rows, index_of.get(row.fetched_by, 0))
                    await self._skip_delivered_elsewhere(chunk, fetchers.get(row.fetched_by))
                except BaseException:
                    self.slots.release()
                    raise
                self.next_chunk = max(self.next_chunk, row.seq + 1)
                self._spawn(chunk)
            await self._drain()
        except BaseException:
            await self._cancel()
            raise

    def _restored(self, row: ChunkRow, rows: list[Any], entry: int) -> Chunk:
        items: list[Item] = []
        chunk = Chunk(row, entry + 1, items, written=True)
        for seq, key, data, delivered_by, sending in rows:
            items.append(Item(seq=seq, data=data, key=key, steps={row.fetched_by: data}))
            if delivered_by:
                chunk.passed[seq] = list(delivered_by)
            if sending:
                self.resent += 1
        return chunk

    async def _skip_delivered_elsewhere(self, chunk: Chunk, fetcher: BoundStep | None) -> None:
        if fetcher is None or not fetcher.only_new:
            return
        keys = [i.key for i in chunk.items if i.key is not None]
        if not keys:
            return
        ledger, run_id = self.recorder.ledger, self.recorder.run_id
        delivered, _ = await asyncio.to_thread(ledger.repeats, run_id, self.workflow.name, keys, delivered=True)
        for item in chunk.items:
            if item.key is not None and item.key in delivered:
                reason = f"already delivered by run {delivered[item.key]} (key {item.key!r})"
                self._end(chunk, Ending(item, Outcome.SKIPPED, fetcher.id, reason))

    # -- the item side -----------------------------------------------------------------

    def _spawn(self, chunk: Chunk, admit: tuple[BoundStep, list[Ending]] | None = None) -> None:
        self.live[chunk.row.seq] = chunk
        task = asyncio.get_running_loop().create_task(self._run_chunk(chunk, admit))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel(self) -> None:
        """The run stops (a timeout, a signal, a failed write): the chunks in flight stop too."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _drain(self) -> None:
        """Wait for the chunks in flight; the first failure of one (the history, say) is raised."""
        while self._tasks:
            done, _ = await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    for other in self._tasks:
                        other.cancel()
                    await asyncio.gather(*self._tasks, return_exceptions=True)
                    raise task.exception()  # type: ignore[misc]

    async def _run_chunk(self, chunk: Chunk, admit: tuple[BoundStep, list[Ending]] | None = None) -> None:
        try:
            if admit is not None:
                await self._admit(admit[0], chunk, admit[1])
            live = [i for i in chunk.items if i.seq not in chunk.ended]
            steps = [b for b in self.workflow.steps[chunk.entry :] if b.phase is not Phase.FETCH]
            at = 0
            while at < len(steps) and live and self.stop is None:
                driver = self.drivers[steps[at].id]
                if isinstance(driver, PerItemDriver):
                    segment = [driver]
                    while at + len(segment) < len(steps):
                        following = self.drivers[steps[at + len(segment)].id]
                        if not isinstance(following, PerItemDriver):
                            break
                        segment.append(following)
                    live = await self._per_item(segment, live, chunk)
                    at += len(segment)
                else:
                    live = await self._batch(driver, live, chunk)
                    at += 1
            if self.stop is not None:
                return  # its unfinished items fail with the run (see end_leftovers)
            last = self.workflow.steps[-1]
            reason = None if self.has_deliver else "passed every step (the workflow has no deliver step)"
            for item in live:
                self._end(chunk, Ending(item, Outcome.DELIVERED, last.id, reason, item.data))
            await self.recorder.chunk_done(chunk.row, chunk.endings)
            self.live.pop(chunk.row.seq, None)
        finally:
            self.slots.release()

    async def _per_item(self, segment: list[PerItemDriver], items: list[Item], chunk: Chunk) -> list[Item]:
        lead = 0
        while lead < len(segment) and segment[lead].inline:
            lead += 1
        # cheap sync steps first: a plain loop over the chunk, step after step
        for driver in segment[:lead]:
            await driver.open(len(items))
            survivors: list[Item] = []
            for item in items:
                if self.stop is not None:
                    return []
                if await self._one(driver, item, chunk, inline=True):
                    survivors.append(item)
            items = survivors
        rest = segment[lead:]
        if not rest or not items:
            return items
        # from the first step that waits (a model, a receiver), each item goes on to the next
        # step as soon as it is done: the first deliveries leave while the model step goes on
        await rest[0].open(len(items))
        kept = await asyncio.gather(*(self._through(rest, item, chunk) for item in items))
        return [item for item, ok in zip(items, kept, strict=True) if ok]

    async def _through(self, segment: list[PerItemDriver], item: Item, chunk: Chunk) -> bool:
        """One item through consecutive per-item steps; False once it ended (or the run stops)."""
        for driver in segment:
            if self.stop is not None:
                return False
            if driver.delivers and driver.bound.id in chunk.passed.get(item.seq, ()):
                continue  # a resumed item: this step delivered it before the crash
            await driver.open(1)
            if not await self._one(driver, item, chunk, inline=False):
                return False
        return True

    async def _one(self, driver: PerItemDriver, item: Item, chunk: Chunk, *, inline: bool) -> bool:
        driver.record.items_in += 1
        if inline:
            failed: Exception | None = None
            try:
                ending = driver.call_inline(item)
            except _RetryNeeded as need:
                failed = need.first  # retried outside this handler: the error keeps its own context
            if failed is not None:
                ending = await driver.retry(item, failed)
        else:
            ending = await driver.one(item, chunk.passed)
        self._step_done(driver, ending)
        if ending is not None:
            self._end(chunk, ending)
            return False
        return True

    async def _batch(self, driver: ItemDriver, items: list[Item], chunk: Chunk) -> list[Item]:
        await driver.open(len(items))
        todo = [i for i in items if not (driver.delivers and driver.bound.id in chunk.passed.get(i.seq, ()))]
        driver.record.items_in += len(todo)
        results = await driver.chunk(todo, chunk.passed)  # type: ignore[attr-defined]
        ended: set[int] = set()
        for item, ending in zip(todo, results, strict=True):
            self._step_done(driver, ending)
            if ending is not None:
                self._end(chunk, ending)
                ended.add(item.seq)
        return [i for i in items if i.seq not in ended]

    def _step_done(self, driver: ItemDriver, ending: Ending | None) -> None:
        record = driver.record
        if ending is None or ending.outcome == Outcome.DELIVERED:
            record.items_out += 1
        if self.progress is not None:
            done = self._done[driver.bound.id] = self._done.get(driver.bound.id, 0) + 1
            total = self.recorder.counts["fetched"]
            if done % 100 == 0 or done == total:
                self.progress(driver.bound.id, done, total)

    def _end(self, chunk: Chunk, ending: Ending) -> None:
        chunk.endings.append(ending)
        chunk.ended.add(ending.item.seq)
        if ending.outcome == Outcome.FAILED and self.workflow.spec.on_item_error == "stop" and self.stop is None:
            reason = self.context.redactor.text(ending.reason) or ""
            self.request_stop(f"an item failed and on_item_error is stop: {reason}", ending.step_id)

    def request_stop(self, error: str, step_id: str | None) -> None:
        """No new chunk, no new step: the calls in flight finish, the rest fails with the run."""
        if self.stop is None:
            self.stop = Stop(error, step_id)

    # -- the end ---------------------------------------------------------------------------

    async def end_leftovers(self, reason: str, step_id: str | None) -> None:
        """The items of unfinished chunks fail (``not processed: …``) and their chunks end."""
        for chunk in list(self.live.values()):
            if not chunk.written:
                # cut off before it was written: its items never entered the run's ledger
                self.live.pop(chunk.row.seq, None)
                continue
            for item in chunk.items:
                if item.seq not in chunk.ended and item.seq not in self.recorder.outcome_queued:
                    chunk.endings.append(Ending(item, Outcome.FAILED, step_id, f"not processed: {reason}"))
                    chunk.ended.add(item.seq)
            await self.recorder.chunk_done(chunk.row, chunk.endings)
            self.live.pop(chunk.row.seq, None)

    async def finish_steps(self, failed: dict[str, str] | None = None) -> None:
        """Each item step's row ends with its counts; a step no item reached gets one too,
        unless the run stopped before it. ``failed``: steps whose close() failed, with why."""
        failed = failed or {}
        for bound in self.workflow.steps:
            driver = self.drivers.get(bound.id)
            if driver is None or (driver.record.opening is None and self.stop is not None):
                continue
            await driver.open()
            summary = self.context.redactor.text(driver.step.summary())  # shown by `automator run`: no secrets
            driver.record.summary = summary
            error = failed.get(bound.id)
            await self.recorder.step_finished(
                driver.record,
                status=StepStatus.FAILED if error else StepStatus.SUCCEEDED,
                error=error,
                retries=driver.caller.retries,
                summary=summary,
            )

    def summaries(self) -> list[tuple[str, str]]:
        """Each step's summary line, in the workflow's order."""
        records = (self.recorder.steps.get(b.id) for b in self.workflow.steps)
        return [(r.bound.id, r.summary) for r in records if r is not None and r.summary is not None]
