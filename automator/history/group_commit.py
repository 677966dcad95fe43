"""Group commit: many small writes from the event loop, one transaction on a writer thread.

Write-ahead means a side effect waits for its intent (and the item for its result) to be
durable. One transaction per write would make that wait the run's pace; here every write
queued while a transaction is being committed joins the next one, so a hundred items
delivered at once share one commit, and the event loop never waits on the database.

A transaction that fails as a whole (not for a lock: that is retried by
:meth:`History.write`) is tried again one write at a time, so one bad write fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection

if TYPE_CHECKING:
    from automator.history.store import History

T = TypeVar("T")
log = logging.getLogger("automator.history")
# a transaction takes at most this many writes: a bounded commit keeps the wait of the
# first one short when the queue is long
MAX_GROUP = 2000
SWITCH_INTERVAL = 0.0005


class _Stop:
    pass


class GroupCommit:
    """One writer thread for one History; :meth:`commit` is awaited from any event loop."""

    def __init__(self, history: History) -> None:
        self._history = history
        self._queue: queue.SimpleQueue[tuple[Callable[[Connection], Any], Future[Any]] | _Stop] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.transactions = 0  # how many commits served how many writes: for benchmarks and tests
        self.writes = 0

    def submit(self, work: Callable[[Connection], T]) -> Future[T]:
        """Queue ``work`` for the next transaction; the future holds its result once committed."""
        future: Future[T] = Future()
        self._start()
        self._queue.put((work, future))
        return future

    async def commit(self, work: Callable[[Connection], T]) -> T:
        """``work`` done and committed (with whatever else was queued), without blocking the loop."""
        return await asyncio.wrap_future(self.submit(work))

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_Stop())
            thread.join()

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                # the writer needs the GIL for a moment at each step of a commit; at Python's
                # default switch interval (5 ms) a busy event loop would keep it waiting that
                # long each time, and an answered request's record with it
                if sys.getswitchinterval() > SWITCH_INTERVAL:
                    sys.setswitchinterval(SWITCH_INTERVAL)
                self._thread = threading.Thread(target=self._serve, name="automator-history-writer", daemon=True)
                self._thread.start()

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            group: list[tuple[Callable[[Connection], Any], Future[Any]]] = []
            first = self._queue.get()
            if isinstance(first, _Stop):
                return
            group.append(first)
            while len(group) < MAX_GROUP:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(more, _Stop):
                    stopping = True
                    break
                group.append(more)
            self._write(group)

    def _write(self, group: list[tuple[Callable[[Connection], Any], Future[Any]]]) -> None:
        live = [(work, future) for work, future in group if future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self._history.write(lambda conn: [work(conn) for work, _ in live])
        except BaseException:  # noqa: BLE001 - each write is tried alone below
            if len(live) == 1:
                _settle(live[0][1], self._attempt(live[0][0]))
                return
            for work, future in live:
                _settle(future, self._attempt(work))
            return
        self.transactions += 1
        self.writes += len(live)
        for (_, future), result in zip(live, results, strict=True):
            future.set_result(result)

    def _attempt(self, work: Callable[[Connection], Any]) -> tuple[bool, Any]:
        try:
            result = self._history.write(work)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
            return False, exc
        self.transactions += 1
        self.writes += 1
        return True, result


def _settle(future: Future[Any], outcome: tuple[bool, Any]) -> None:
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
