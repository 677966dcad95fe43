"""Each run in its own thread with its own event loop.

The scheduler's loop never runs a step: a run that computes for minutes, or blocks on
a slow disk, or waits on the database, cannot delay another workflow's fire.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from automator.engine.runner import Run, RunResult
from automator.history.store import History
from automator.plugins.events import RunStarted
from automator.plugins.hookspecs import hookimpl
from automator.plugins.manager import Plugins
from automator.spec.loader import Workflow

_current = threading.local()


@dataclass
class Fire:
    """A reason to run a workflow: a scheduled fire, a catch-up, a manual trigger, a resume."""

    workflow: str
    trigger: str  # schedule | catch_up | manual
    scheduled_for: datetime | None = None
    params: dict[str, Any] = field(default_factory=dict)
    request_id: int | None = None
    resume_run_id: int | None = None
    notify_run_id: int | None = None  # a crashed run that is not resumed: its on_failure steps
    pinned: Workflow | None = None  # a resumed run continues on the version it started with

    @property
    def may_skip(self) -> bool:
        # catch-up, manual and resumed runs were asked for explicitly: they wait, never skip
        return self.trigger == "schedule" and self.resume_run_id is None and self.notify_run_id is None


class RunThread:
    def __init__(
        self,
        fire: Fire,
        workflow: Workflow,
        history: History,
        plugins: Plugins,
        on_done: Callable[[RunThread], None],
    ) -> None:
        self.fire = fire
        self.workflow = workflow
        self.history = history
        self.plugins = plugins
        self.on_done = on_done
        self.run_id: int | None = fire.resume_run_id
        self.result: RunResult | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[RunResult] | None = None
        self._cancel_asked = False
        self.thread = threading.Thread(target=self._main, name=f"run:{workflow.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        _current.handle = self
        loop = asyncio.new_event_loop()
        try:
            run = Run(
                self.workflow,
                self.history,
                self.plugins,
                params=self.fire.params,
                trigger=self.fire.trigger,
                scheduled_for=self.fire.scheduled_for,
            )
            if self.fire.notify_run_id:
                coro = run.notify_failure(self.fire.notify_run_id)
            elif self.fire.resume_run_id:
                coro = run.resume(self.fire.resume_run_id)
            else:
                coro = run.execute()
            with self._lock:
                self._loop = loop
                self._task = loop.create_task(coro)
                if self._cancel_asked:
                    self._task.cancel()
            self.result = loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            self.cancelled = True
        except BaseException as exc:  # noqa: BLE001 - handed to the daemon, which logs it; the thread must end
            self.error = exc
        finally:
            with self._lock:
                self._loop = None
            # close without waiting for worker threads of blocking steps still busy after a cancel
            loop.close()
            _current.handle = None
            self.on_done(self)

    def cancel(self) -> None:
        """Interrupt the run (it records itself as interrupted)."""
        with self._lock:
            self._cancel_asked = True
            if self._loop is not None and self._task is not None:
                self._loop.call_soon_threadsafe(self._task.cancel)

    def alive(self) -> bool:
        return self.thread.is_alive()


def current_run() -> RunThread | None:
    """The run this thread is executing, if any."""
    return getattr(_current, "handle", None)


class RunIds:
    """Lifecycle observer: tells each run thread its run id as soon as the run is recorded."""

    def __init__(self, on_started: Callable[[RunThread], None]) -> None:
        self.on_started = on_started

    @hookimpl
    def run_started(self, event: RunStarted) -> None:
        handle = current_run()
        if handle is not None:
            handle.run_id = event.run.id
            self.on_started(handle)
