"""One driver per step shape: the only code that calls a step's phase methods.

A driver takes items (one, or a chunk) through one step under the step's retry policy,
timeout and concurrency, and says what became of each: ``None`` (it goes on, its data as
the step left it) or an :class:`~automator.engine.recorder.Ending`. Deliveries are
written ahead through the recorder: intent, call, result, and only then does the item
(and the step's concurrency slot) move on — so a crash can repeat only the deliveries in
flight, never more than the step's concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from itertools import islice
from typing import Any, cast

from automator.engine.calls import Caller, describe_error, is_retryable
from automator.engine.recorder import Ending, Recorder, StepRecord
from automator.errors import QuarantineItem, SkipItem, StepError
from automator.history.states import Outcome, StepStatus
from automator.plugins.steps import PHASE_METHOD, FetchStep, Item, Phase, Shape, Step
from automator.spec.loader import BoundStep, Workflow


def make_caller(workflow: Workflow, bound: BoundStep) -> Caller:
    defaults = workflow.spec.defaults
    return Caller(
        retry=bound.spec.retry or defaults.retry,
        timeout=bound.spec.timeout or defaults.timeout,
        blocking=bound.type.blocking,
    )


def timeout_text(exc: BaseException, caller: Caller) -> str | None:
    if isinstance(exc, TimeoutError) and caller.timeout is not None:
        return f"timed out after {caller.timeout.total_seconds():g}s"
    return None


class FetchFailed(Exception):  # noqa: N818 - the run's stop, with the step's account
    def __init__(self, error: str, step_id: str) -> None:
        super().__init__(error)
        self.error = error
        self.step_id = step_id


# -- fetch --------------------------------------------------------------------------------


class _End:
    pass


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Pages:
    """What a fetch returned, taken a chunk at a time: a list, an iterator, or an async iterator."""

    def __init__(self, source: Any, *, blocking: bool, size: int) -> None:
        self.done = False
        self._list: list[Any] | None = None
        self._iter: Iterator[Any] | None = None
        self._queue: asyncio.Queue[Any] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._ahead: asyncio.Future[tuple[list[Any], BaseException | None]] | None = None
        self.blocking = blocking
        # a failure met after some items: those go on first, the failure is raised by the next take
        self._failure: BaseException | None = None
        if source is None:
            self._list = []
        elif isinstance(source, list | tuple):
            self._list = list(source)
        elif hasattr(source, "__aiter__"):
            self._queue = asyncio.Queue(maxsize=size)
            self._pump = asyncio.get_running_loop().create_task(self._fill(cast(AsyncIterator[Any], source)))
        elif isinstance(source, Iterable) and not isinstance(source, str | bytes | dict):
            self._iter = iter(source)
        else:
            raise StepError(f"returned {type(source).__name__}, not a list of items", retryable=False)
        self._offset = 0

    async def _fill(self, source: AsyncIterator[Any]) -> None:
        assert self._queue is not None
        try:
            async for value in source:
                await self._queue.put(value)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            await self._queue.put(_Failed(exc))
            return
        await self._queue.put(_End())

    async def take(self, size: int) -> list[Any]:
        """Up to ``size`` items: what is there now (a page), or, when nothing is, the next to come."""
        if self._failure is not None:
            raised, self._failure = self._failure, None
            raise raised
        if self.done:
            return []
        if self._list is not None:
            part = self._list[self._offset : self._offset + size]
            self._offset += len(part)
            if self._offset >= len(self._list):
                self.done = True
                self._list = []
            return part
        if self._iter is not None:
            source = self._iter
            if self.blocking:  # a generator that reads files or sockets: in a thread, a chunk at a time
                ahead, self._ahead = self._ahead, None
                read: tuple[list[Any], BaseException | None]
                read = await (ahead if ahead is not None else asyncio.to_thread(_read, source, size))
                part, failure = read
                if len(part) == size and failure is None:
                    # the next chunk is read while this one goes on (one chunk ahead, no more)
                    self._ahead = asyncio.ensure_future(asyncio.to_thread(_read, source, size))
            else:
                part, failure = _read(source, size)
            if len(part) < size or failure is not None:
                self.done = True
            if failure is not None:
                if not part:
                    raise failure
                self._failure = failure
            return part
        assert self._queue is not None
        page: list[Any] = []
        first = await self._queue.get()
        while True:
            if isinstance(first, _End):
                self.done = True
                return page
            if isinstance(first, _Failed):
                self.done = True
                if page:  # the items before the failure go on; the failure comes with the next take
                    self._failure = first.exc
                    return page
                raise first.exc
            page.append(first)
            if len(page) >= size:
                return page
            try:
                first = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return page  # the page so far goes on while the next one is fetched

    async def close(self) -> None:
        if self._ahead is not None:
            # a read in its thread cannot be stopped: let it end, and drop what it read
            with contextlib.suppress(Exception):
                await self._ahead
            self._ahead = None
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump


def _read(source: Iterator[Any], size: int) -> tuple[list[Any], BaseException | None]:
    """Up to ``size`` items of an iterator, and the failure that cut it short (the items
    read before it are kept)."""
    part: list[Any] = []
    try:
        part.extend(islice(source, size))
    except Exception as exc:  # noqa: BLE001 - handed to the reader after the items before it
        return part, exc
    return part, None


class FetchDriver:
    """A fetch step: its items, a chunk at a time, as they come; each failed try is a step row."""

    def __init__(self, bound: BoundStep, step: Step[Any], caller: Caller, recorder: Recorder) -> None:
        self.bound = bound
        self.step = step
        self.caller = caller
        self.recorder = recorder
        self.record = recorder.step(bound)
        self.count = 0

    async def pages(self, size: int, restart: Callable[[], None] | None = None) -> AsyncGenerator[list[Any], None]:
        """The fetched items, ``size`` at most per list. Raises FetchFailed (the step row written).

        A retryable failure after some pages is retried under the step's retry policy: the
        fetch is called again after ``restart()`` (which tells the step where to go on:
        its last checkpoint) instead of failing the run with the pages it has.
        """
        recorder, bound = self.recorder, self.bound
        await recorder.step_started(self.record)

        def failed_attempt(exc: BaseException) -> None:
            # each try of a fetch is its own step attempt in the history
            error = timeout_text(exc, self.caller) or describe_error(exc)
            recorder.step_failed_soon(self.record, error=error, retries=0)
            self.record = recorder.new_attempt(self.record)

        async def start() -> tuple[_Pages, list[Any]]:
            if self.record.row_id is None:
                await recorder.step_started(self.record)
            source = await _fetch_once(self.step, self.caller)
            pages = _Pages(source, blocking=self.caller.blocking, size=size)
            try:
                return pages, await pages.take(size)
            except BaseException:
                await pages.close()
                raise

        self.caller.on_failed_attempt = failed_attempt
        try:
            pages, first = await self.caller.call(start)
        except Exception as exc:  # noqa: BLE001 - any failure of the fetch ends the run, recorded
            error = await self._failed(exc, self.caller.retries)
            raise FetchFailed(f"step {bound.id} ({bound.type.name}) failed: {error}", bound.id) from None
        restarts = 0
        try:
            part = first
            while part:
                self.count += len(part)
                self.record.items_out += len(part)
                yield part
                try:
                    part = await pages.take(size)
                except Exception as exc:  # noqa: BLE001 - a page failed after others went on
                    if restart is None or restarts >= self.caller.retry.attempts - 1 or not is_retryable(exc):
                        error = await self._failed(exc, self.caller.retries)
                        raise FetchFailed(
                            f"step {bound.id} ({bound.type.name}) failed after {self.count} items: {error}", bound.id
                        ) from None
                    restarts += 1
                    self.caller.retries += 1
                    failed_attempt(exc)
                    await pages.close()
                    await asyncio.sleep(self.caller.backoff(restarts, exc))
                    restart()
                    try:
                        pages, part = await self.caller.call(start)
                    except Exception as again:  # noqa: BLE001 - the retries are spent: the run ends, recorded
                        error = await self._failed(again, self.caller.retries)
                        raise FetchFailed(
                            f"step {bound.id} ({bound.type.name}) failed after {self.count} items: {error}", bound.id
                        ) from None
        finally:
            await pages.close()

    async def _failed(self, exc: BaseException, retries: int) -> str:
        error = timeout_text(exc, self.caller) or describe_error(exc)
        await self.recorder.step_finished(
            self.record, status=StepStatus.FAILED, error=error, retries=retries, summary=None
        )
        return error

    async def finished(self) -> None:
        summary = self.recorder.context.redactor.text(self.step.summary())  # shown by `automator run`: no secrets
        self.record.summary = summary
        await self.recorder.step_finished(
            self.record, status=StepStatus.SUCCEEDED, error=None, retries=self.caller.retries, summary=summary
        )


async def _fetch_once(step: Step[Any], caller: Caller) -> Any:
    """One call of ``fetch()`` (a thread for a blocking step; a generator is only made here)."""
    method = cast(FetchStep[Any], step).fetch
    if inspect.iscoroutinefunction(method):
        return await method()
    if caller.blocking and not inspect.isgeneratorfunction(inspect.unwrap(method)):
        return await asyncio.to_thread(method)
    result = method()
    if inspect.isawaitable(result):
        return await result
    return result


# -- item steps ---------------------------------------------------------------------------


class ItemDriver:
    """What the item-step drivers share: the step, its caller, its row, the recorder."""

    shape: Shape

    def __init__(self, bound: BoundStep, step: Step[Any], caller: Caller, recorder: Recorder, *, last: bool) -> None:
        self.bound = bound
        self.step = step
        self.caller = caller
        self.recorder = recorder
        self.record: StepRecord = recorder.step(bound)
        self.last = last  # the workflow's last step: a delivery there ends the item
        self.delivers = bound.phase is Phase.DELIVER
        self.when = bound.spec.when

    def passes_by(self, item: Item) -> bool:
        """True when the step's ``when:`` is false for the item: it passes the step untouched.

        Raises StepError when the template cannot be rendered for the item.
        """
        if self.when is None:
            return False
        return not truthy(self.recorder.context.render(self.when, item))

    async def open(self, items_in: int = 0) -> None:
        """The step's row, when the first chunk reaches it (``items_in``: that chunk's items)."""
        await self.recorder.step_started(self.record, items_in)

    def _signal(self, item: Item, exc: BaseException) -> Ending:
        step_id = self.bound.id
        if isinstance(exc, SkipItem):
            return Ending(item, Outcome.SKIPPED, step_id, exc.reason)
        if isinstance(exc, QuarantineItem):
            return Ending(item, Outcome.QUARANTINED, step_id, exc.reason, item.data)
        error = timeout_text(exc, self.caller) or describe_error(exc)
        return Ending(item, Outcome.FAILED, step_id, error, item.data)

    def _took(self, item: Item, result: Any) -> Ending | None:
        """A transform's result becomes the item's data (None filters it out)."""
        if self.bound.phase is Phase.TRANSFORM:
            if result is None:
                return Ending(item, Outcome.SKIPPED, self.bound.id, f"filtered out by {self.bound.id}")
            if isinstance(result, list):  # a split: the pipeline makes the new items
                reason = f"split into {len(result)} items by {self.bound.id}"
                return Ending(item, Outcome.SKIPPED, self.bound.id, reason, children=result)
            item.data = result if isinstance(result, dict) else {"value": result}
        item.steps = {**item.steps, self.bound.id: item.data}
        return None

    async def _delivered(self, items: list[Item], passed: dict[int, list[str]]) -> list[Ending | None]:
        """A delivery's result, durable before the items move on: the last step ends them."""
        if self.last:
            endings = [Ending(i, Outcome.DELIVERED, self.bound.id, None, i.data, recorded=True) for i in items]
            await self.recorder.ended(endings)
            return list(endings)
        await self.recorder.passed(self.bound, items, passed)
        return [None] * len(items)


# rendered text that means false (a `when:` rendering "{{ item.flag }}" of a string field, say)
_FALSE_TEXT = frozenset({"", "false", "no", "off", "0", "none", "null"})


def truthy(value: Any) -> bool:
    """A rendered ``when:``: Python's truth, except that text like "false", "no", "0" is false."""
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_TEXT
    return bool(value)


class _RetryNeeded(Exception):  # noqa: N818 - the inline path hands a failure to the async retry
    def __init__(self, first: Exception) -> None:
        self.first = first


class PerItemDriver(ItemDriver):
    """transform / validate / deliver(item): one item per call, ``concurrency`` at once."""

    shape = Shape.PER_ITEM

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method = getattr(self.step, PHASE_METHOD[self.bound.phase])
        concurrency = self.bound.spec.concurrency or self.bound.type.default_concurrency
        self.slots = asyncio.Semaphore(concurrency)
        # the hot path for cheap sync steps: a plain call, no task, no slot (a delivery never:
        # it waits for its intent to be written)
        self.inline = not (self.bound.type.blocking or inspect.iscoroutinefunction(self.method) or self.delivers)

    def call_inline(self, item: Item) -> Ending | None:
        """The step on one item, synchronously; raises _RetryNeeded when a retry may help."""
        try:
            result = self.method(item)
        except (SkipItem, QuarantineItem) as signal:
            return self._signal(item, signal)
        except Exception as first:  # noqa: BLE001 - the async path decides on a retry
            raise _RetryNeeded(first) from None
        if inspect.isawaitable(result):
            raise AssertionError("an inline step returned an awaitable")  # pragma: no cover
        return self._took(item, result)

    async def retry(self, item: Item, first: Exception) -> Ending | None:
        try:
            result = await self.caller.retry_after_failure(self.method, (item,), first)
        except Exception as exc:  # noqa: BLE001 - the item's outcome; the run goes on
            return self._signal(item, exc)
        return self._took(item, result)

    async def one(self, item: Item, passed: dict[int, list[str]]) -> Ending | None:
        if self.inline:
            try:
                return self.call_inline(item)
            except _RetryNeeded as need:
                failed = need.first  # retried outside this handler: the error keeps its own context
            return await self.retry(item, failed)
        async with self.slots:
            if self.delivers:
                return await self._deliver(item, passed)
            try:
                result = await self.caller.call(self.method, item)
            except Exception as exc:  # noqa: BLE001 - the item's outcome; the run goes on
                return self._signal(item, exc)
            return self._took(item, result)

    async def _deliver(self, item: Item, passed: dict[int, list[str]]) -> Ending | None:
        await self.recorder.sending(self.bound, [item])
        try:
            await self.caller.call(self.method, item)
        except Exception as exc:  # noqa: BLE001 - the item's outcome, recorded before the slot frees
            ending = self._signal(item, exc)
            ending.recorded = True
            await self.recorder.ended([ending])
            return ending
        self._took(item, None)
        return (await self._delivered([item], passed))[0]


class BatchTransformDriver(ItemDriver):
    """transform_batch(items): a chunk in one call (a Batch API), one outcome per item, in order.

    No retry or per-item timeout around it: the step owns both (a batch may take hours,
    and calling it again must not submit the work twice).
    """

    shape = Shape.BATCH_TRANSFORM

    async def chunk(self, items: list[Item], passed: dict[int, list[str]]) -> list[Ending | None]:
        if not items:
            return []
        try:
            outcomes = self.step.transform_batch(items)  # type: ignore[attr-defined]
            if inspect.isawaitable(outcomes):
                outcomes = await outcomes
            outcomes = list(outcomes)
            if len(outcomes) != len(items):
                raise StepError(f"{self.bound.type.name} returned {len(outcomes)} outcomes for {len(items)} items")
        except Exception as exc:  # noqa: BLE001 - all the chunk's items fail, recorded
            error = describe_error(exc)
            return [Ending(item, Outcome.FAILED, self.bound.id, error, item.data) for item in items]
        results: list[Ending | None] = []
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                results.append(self._signal(item, outcome))
            else:
                results.append(self._took(item, outcome))
        return results


class BatchDeliverDriver(ItemDriver):
    """deliver_batch(items): a chunk in one call, delivered (or failed) together, written ahead."""

    shape = Shape.BATCH_DELIVER

    async def chunk(self, items: list[Item], passed: dict[int, list[str]]) -> list[Ending | None]:
        if not items:
            return []
        await self.recorder.sending(self.bound, items)
        try:
            await self.caller.call(self.step.deliver_batch, items)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - all the chunk's items fail, recorded
            error = timeout_text(exc, self.caller) or describe_error(exc)
            endings = [Ending(i, Outcome.FAILED, self.bound.id, error, i.data, recorded=True) for i in items]
            await self.recorder.ended(endings)
            return list(endings)
        for item in items:
            self._took(item, None)
        if self.last:
            # the chunk ends right after its last step: these results are written with the
            # chunk's end, in the same transaction (nothing leaves before it is durable)
            return [Ending(i, Outcome.DELIVERED, self.bound.id, None, i.data) for i in items]
        return await self._delivered(items, passed)


def item_driver(bound: BoundStep, step: Step[Any], caller: Caller, recorder: Recorder, *, last: bool) -> ItemDriver:
    """The driver for the step's declared shape (a deliver step with ``group:``: in groups)."""
    if bound.spec.group is not None and bound.phase is Phase.DELIVER:
        from automator.engine.groups import GroupDeliverDriver  # it builds on this module

        return GroupDeliverDriver(bound, step, caller, recorder, last=last)
    drivers: dict[Shape, type[ItemDriver]] = {
        Shape.PER_ITEM: PerItemDriver,
        Shape.BATCH_TRANSFORM: BatchTransformDriver,
        Shape.BATCH_DELIVER: BatchDeliverDriver,
    }
    return drivers[step.shape](bound, step, caller, recorder, last=last)
