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
import logging
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
from automator.engine.groups import GroupDeliverDriver
from automator.engine.recorder import Ending, Recorder
from automator.errors import AutomatorError, StepError
from automator.history.rows import ChunkRow
from automator.history.states import ChunkStatus, Outcome, StepStatus
from automator.plugins.steps import Checkpoint, FetchStep, Item, Phase, Step
from automator.spec.loader import BoundStep, Workflow

ProgressCallback = Callable[[str, int, int], None]
# the driver for a step (``drivers.item_driver``; the dry run passes its own for model and deliver steps)
DriverFactory = Callable[..., ItemDriver]
DEFAULT_CHUNK_SIZE = 100
log = logging.getLogger("automator.engine")
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
    holds_slot: bool = False  # one of the places in flight (given up while it waits for its digests)
    only_new: bool = False  # its items are skipped if a run delivered their key (its fetch step's setting)
    written: bool = False  # in the ledger (until then its items are not the run's yet)
    splits: list[tuple[int, Ending]] = field(default_factory=list)  # (step index, parent) not yet split out
    groups: dict[int, str] = field(default_factory=dict)  # item seq -> its digest's key, when in flight


@dataclass
class FetchMark:
    """Where a fetch is: the state of its last Checkpoint, and the items taken after it.

    A resumed run starts the fetch again from ``state`` and drops the ``after`` items that
    follow it: the run has them already (``drop`` counts down while they come again).
    """

    state: Any = None
    after: int = 0
    drop: int = 0

    @classmethod
    def after_chunk(cls, row: ChunkRow, before: FetchMark | None) -> FetchMark:
        """Where the fetch was at the end of a chunk: the mark written with it, or for a chunk
        recorded before marks existed, the mark before it and its items."""
        written = row.fetch_mark
        if isinstance(written, dict) and isinstance(written.get("after"), int):
            return cls(written.get("state"), written["after"])
        before = before or cls()
        return cls(before.state, before.after + row.size)

    def row(self) -> dict[str, Any]:
        return {"state": self.state, "after": self.after}

    def resumed(self) -> FetchMark:
        return FetchMark(self.state, self.after, drop=self.after)

    def describe(self) -> str:
        where = "its start" if self.state is None else "its last checkpoint"
        return f"{where}, {self.after} items the run has dropped"


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
        self._index = {b.id: i for i, b in enumerate(bounds)}
        # digests: groups go when no more items can join them (see _groups_may_go)
        self.groupers = [d for d in self.drivers.values() if isinstance(d, GroupDeliverDriver)]
        for grouper in self.groupers:
            grouper.on_park = self._groups_may_go
            # items waiting for their groups: at least ten groups' worth, and the chunks in flight
            grouper.park_limit = max(10 * grouper.size, self.chunk_size * spec.chunks_in_flight)
        self.fetch_done = False
        self.mark = FetchMark()  # the fetch at work: where it is

    # -- the fetch side ----------------------------------------------------------------

    async def run(self) -> None:
        """Every fetch step in order, its chunks through the item steps, until all are done."""
        try:
            for index, bound in enumerate(self.workflow.steps):
                if bound.phase is not Phase.FETCH or self.stop is not None:
                    continue
                await self._fetch(index, bound)
            self._fetched_all()
            await self._drain()
        except BaseException:
            await self._cancel()
            raise

    async def _fetch(self, index: int, bound: BoundStep, mark: FetchMark | None = None) -> None:
        """The fetch step's items, chunk by chunk; ``mark``: where a resumed run's fetch goes on."""
        step = self.steps[bound.id]
        self.mark = mark or FetchMark()
        if isinstance(step, FetchStep):
            step.resume_from = self.mark.state
        driver = FetchDriver(bound, step, make_caller(self.workflow, bound), self.recorder)

        def restart() -> None:
            # a retry after a failed page goes on from the last checkpoint, as a resumed run does
            if isinstance(step, FetchStep):
                step.resume_from = self.mark.state
            self.mark.drop = self.mark.after

        pages = driver.pages(self.chunk_size, restart)
        try:
            async for part in pages:
                part = self._taken(part)
                if not part:
                    continue  # only checkpoints, or items the run had already
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

    def _taken(self, part: list[Any]) -> list[Any]:
        """A page without its checkpoints (noted in the mark) and without the items a resumed
        run took already after its last checkpoint."""
        mark = self.mark
        if mark.drop == 0 and not any(type(v) is Checkpoint for v in part):
            mark.after += len(part)
            return part
        kept: list[Any] = []
        for value in part:
            if type(value) is Checkpoint:
                mark.state, mark.after, mark.drop = value.state, 0, 0
            elif mark.drop > 0:
                mark.drop -= 1
                mark.after += 1
            else:
                mark.after += 1
                kept.append(value)
        return kept

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
        row = ChunkRow(
            self.next_chunk, first, len(items), bound.id, ChunkStatus.OPEN, self.recorder.owner, self.mark.row()
        )
        self.next_chunk += 1
        return Chunk(row, index + 1, items, only_new=bound.only_new), endings

    async def _admit(self, bound: BoundStep, chunk: Chunk, endings: list[Ending]) -> None:
        """Write the chunk before any step sees it (unless it is), and end repeats (``only_new``)."""
        items = chunk.items
        if not chunk.written:
            await self.recorder.chunk_fetched(chunk.row, items)
            chunk.written = True
        for ending in endings:
            self._end(chunk, ending)
        keys = [i.key for i in items if i.key is not None and i.seq not in chunk.ended]
        if chunk.only_new and keys:
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

    async def resume(self, chunks: list[ChunkRow], finished: set[str] | None = None) -> None:
        """The chunks of a run whose process died: the open ones claimed, their pending items
        through the rest; then each fetch that had not got to its end (``finished``: the
        steps that had) goes on from its last checkpoint.

        Items restart after their fetch, from the data the ledger keeps, and pass by the
        deliver steps they reached already; an item whose delivery was in flight is sent
        again (same idempotency key). A pending item whose key another run delivered
        since is skipped before any step sees it.
        """
        index_of = {b.id: i for i, b in enumerate(self.workflow.steps)}
        fetchers = {b.id: b for b in self.workflow.steps if b.phase is Phase.FETCH}
        ledger, run_id = self.recorder.ledger, self.recorder.run_id
        marks: dict[str, FetchMark] = {}
        for row in chunks:
            self.next_chunk = max(self.next_chunk, row.seq + 1)
            self.next_seq = max(self.next_seq, row.first + row.size)
            if row.fetched_by in fetchers:
                marks[row.fetched_by] = FetchMark.after_chunk(row, marks.get(row.fetched_by))
        try:
            for row in chunks:
                if row.status != ChunkStatus.OPEN:
                    continue
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
                self._spawn(chunk)
            if finished is not None:
                for index, bound in enumerate(self.workflow.steps):
                    if bound.phase is Phase.FETCH and bound.id not in finished and self.stop is None:
                        mark = marks.get(bound.id)
                        if mark is not None:
                            log.info("run %s: %s goes on fetching after %s", run_id, bound.id, mark.describe())
                        await self._fetch(index, bound, mark.resumed() if mark else None)
            self._fetched_all()
            await self._drain()
        except BaseException:
            await self._cancel()
            raise

    def _restored(self, row: ChunkRow, rows: list[Any], entry: int) -> Chunk:
        items: list[Item] = []
        chunk = Chunk(row, entry + 1, items, written=True)
        for seq, key, data, delivered_by, sending, group_key in rows:
            items.append(Item(seq=seq, data=data, key=key, steps={row.fetched_by: data}))
            if group_key is not None and sending is not None:
                chunk.groups[seq] = group_key  # a digest in flight: sent again as the same group
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

    def _spawn(
        self, chunk: Chunk, admit: tuple[BoundStep, list[Ending]] | None = None, *, has_slot: bool = True
    ) -> None:
        """The chunk through the item steps in a task of its own; ``has_slot``: the caller took
        its place among the chunks in flight (else the task waits for one)."""
        self.live[chunk.row.seq] = chunk
        task = asyncio.get_running_loop().create_task(self._run_chunk(chunk, admit, has_slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel(self) -> None:
        """The run stops (a timeout, a signal, a failed write): the chunks in flight stop too."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for grouper in self.groupers:
            await grouper.cancel()

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

    async def _run_chunk(
        self, chunk: Chunk, admit: tuple[BoundStep, list[Ending]] | None = None, has_slot: bool = True
    ) -> None:
        if not has_slot:
            await self.slots.acquire()
        chunk.holds_slot = True
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
                if chunk.splits:
                    await self._split_out(chunk)
            if self.stop is not None:
                return  # its unfinished items fail with the run (see end_leftovers)
            for item in live:
                self._end(chunk, self._through_all(chunk, item))
            await self.recorder.chunk_done(chunk.row, chunk.endings)
            self.live.pop(chunk.row.seq, None)
        finally:
            if chunk.holds_slot:
                chunk.holds_slot = False
                self.slots.release()
            self._groups_may_go()

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

    def _passes_by(self, driver: ItemDriver, item: Item, chunk: Chunk) -> bool | None:
        """The step's ``when:`` for the item: True, it passes by untouched; None, it ended
        (the condition could not be rendered); False, the step takes it."""
        try:
            return driver.passes_by(item)
        except AutomatorError as exc:
            self._end(chunk, Ending(item, Outcome.FAILED, driver.bound.id, f"when: {exc.message}", item.data))
            return None

    async def _one(self, driver: PerItemDriver, item: Item, chunk: Chunk, *, inline: bool) -> bool:
        if driver.when is not None and (by := self._passes_by(driver, item, chunk)) is not False:
            return by is True
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
        if driver.when is not None:
            todo = [i for i in todo if self._passes_by(driver, i, chunk) is False]
            items = [i for i in items if i.seq not in chunk.ended]
        if isinstance(driver, GroupDeliverDriver):
            # waiting for its groups, the chunk gives up its place in flight: the fetch and
            # the other chunks go on and bring more items to fill the groups
            chunk.holds_slot = False
            self.slots.release()
            try:
                results = await driver.collect(todo, chunk)  # counted per group, when it goes
            finally:
                await self.slots.acquire()
                chunk.holds_slot = True
        else:
            driver.record.items_in += len(todo)
            results = await driver.chunk(todo, chunk.passed)  # type: ignore[attr-defined]
        ended: set[int] = set()
        for item, ending in zip(todo, results, strict=True):
            self._step_done(driver, ending)
            if ending is not None:
                self._end(chunk, ending)
                ended.add(item.seq)
        return [i for i in items if i.seq not in ended]

    def _through_all(self, chunk: Chunk, item: Item) -> Ending:
        """The outcome of an item that came through every step without ending on the way."""
        last = self.workflow.steps[-1]
        if not self.has_deliver:
            return Ending(
                item, Outcome.DELIVERED, last.id, "passed every step (the workflow has no deliver step)", item.data
            )
        passed = chunk.passed.get(item.seq)
        if passed:  # an earlier deliver step took it; a later one's `when:` let it pass by
            return Ending(item, Outcome.DELIVERED, passed[-1], None, item.data)
        if self.drivers[last.id].delivers and self.drivers[last.id].when is None:
            return Ending(item, Outcome.DELIVERED, last.id, None, item.data)  # a batch delivery, written with the chunk
        skipped = [b.id for b in self.workflow.steps if b.phase is Phase.DELIVER]
        return Ending(item, Outcome.SKIPPED, last.id, f"no deliver step took it (when: false at {', '.join(skipped)})")

    def _step_done(self, driver: ItemDriver, ending: Ending | None) -> None:
        record = driver.record
        if ending is None or ending.outcome == Outcome.DELIVERED:
            record.items_out += 1
        if self.progress is not None:
            done = self._done[driver.bound.id] = self._done.get(driver.bound.id, 0) + 1
            total = self.recorder.counts["fetched"]
            if done % 100 == 0 or done == total:
                self.progress(driver.bound.id, done, total)

    async def _split_out(self, chunk: Chunk) -> None:
        """Items a transform returned a list for become new items, in a chunk of their own per
        step: written with the parents' ends in one transaction, then sent through the later steps."""
        splits, chunk.splits = chunk.splits, []
        by_step: dict[int, list[Ending]] = {}
        for index, parent in splits:
            by_step.setdefault(index, []).append(parent)
        for index, parents in by_step.items():
            bound = self.workflow.steps[index]
            first = self.next_seq
            children: list[Item] = []
            endings: list[Ending] = []
            for parent in parents:
                made = self._children(bound, parent, first + len(children), endings)
                if len(made) == 1:
                    parent.reason = f"split into 1 item ({made[0].seq}) by {bound.id}"
                elif made:
                    start = made[0].seq
                    parent.reason = f"split into {len(made)} items ({start}-{start + len(made) - 1}) by {bound.id}"
                else:
                    parent.reason = f"split into no items by {bound.id}"
                children.extend(made)
            self.drivers[bound.id].record.items_out += len(children)  # the step's OUT: the items it made
            self.next_seq += len(children)
            row = ChunkRow(self.next_chunk, first, len(children), bound.id, ChunkStatus.OPEN, self.recorder.owner)
            self.next_chunk += 1
            await self.recorder.chunk_fetched(row, children, parents)
            chunk.endings.extend(parents)
            if children:
                # its own task waits for a place in flight: this chunk holds one and must not wait
                made_chunk = Chunk(row, index + 1, children, written=True, only_new=chunk.only_new)
                self._spawn(made_chunk, admit=(bound, endings), has_slot=False)

    def _children(self, bound: BoundStep, parent: Ending, first: int, endings: list[Ending]) -> list[Item]:
        """The items a split parent becomes: numbered from ``first``, keyed by the step's
        ``key:`` or the parent's key and their position (a key that cannot be made fails its item)."""
        children: list[Item] = []
        for position, data in enumerate(parent.children or [], start=1):
            if not isinstance(data, dict):
                data = {"value": data}
            child = Item(seq=first + position - 1, data=data, steps={**parent.item.steps, bound.id: data})
            if bound.spec.key is not None:
                try:
                    child.key = self.context.render_text(bound.spec.key, child)
                except StepError as exc:
                    endings.append(Ending(child, Outcome.FAILED, bound.id, f"key: {exc.message}", data))
            elif parent.item.key is not None:
                child.key = f"{parent.item.key}/{position}"
            children.append(child)
        return children

    def _end(self, chunk: Chunk, ending: Ending) -> None:
        chunk.ended.add(ending.item.seq)
        if ending.children is not None:
            # written when its children are (see _split_out); they go on instead of it
            chunk.splits.append((self._index[ending.step_id or ""], ending))
            return
        chunk.endings.append(ending)
        if ending.outcome == Outcome.FAILED and self.workflow.spec.on_item_error == "stop" and self.stop is None:
            reason = self.context.redactor.text(ending.reason) or ""
            self.request_stop(f"an item failed and on_item_error is stop: {reason}", ending.step_id)

    def request_stop(self, error: str, step_id: str | None) -> None:
        """No new chunk, no new step: the calls in flight finish, the rest fails with the run."""
        if self.stop is None:
            self.stop = Stop(error, step_id)
            for grouper in self.groupers:
                grouper.abandon()  # a digest not sent yet is not sent: its items end with the run

    # -- digests ------------------------------------------------------------------------------

    def _fetched_all(self) -> None:
        self.fetch_done = True
        self._groups_may_go()

    def _groups_may_go(self) -> None:
        """Open groups go when no more items can join them (the fetch is done and every chunk
        left waits at a group step), or when a group step holds as many waiting items as it
        may (memory stays bounded whatever the number of ``by`` values)."""
        if not self.groupers or self.stop is not None:
            return
        parked = sum(g.parked for g in self.groupers)
        if self.fetch_done and parked > 0 and parked >= len(self.live):
            # the first group step with waiting items: what it sends may still join a later one's groups
            next(g for g in self.groupers if g.parked > 0).flush()
        for grouper in self.groupers:
            if grouper.waiting_items > grouper.park_limit:
                grouper.flush()

    # -- the end ---------------------------------------------------------------------------

    async def end_leftovers(self, reason: str, step_id: str | None) -> None:
        """The items of unfinished chunks fail (``not processed: …``) and their chunks end."""
        for chunk in list(self.live.values()):
            if not chunk.written:
                # cut off before it was written: its items never entered the run's ledger
                self.live.pop(chunk.row.seq, None)
                continue
            for _, parent in chunk.splits:  # decided, never split out: they end with the run
                parent.children, parent.outcome, parent.reason = None, Outcome.FAILED, f"not processed: {reason}"
                chunk.endings.append(parent)
            chunk.splits = []
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
