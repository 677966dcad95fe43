"""Lifecycle hooks during real runs, and step types written as plain functions or coroutines."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest
from pydantic import Field

from automator import (
    DeliverStep,
    FetchStep,
    Item,
    ItemOutcome,
    QuarantineItem,
    RunFinished,
    RunStarted,
    StepConfig,
    StepFinished,
    StepStarted,
    TransformStep,
    ValidateStep,
    hookimpl,
)
from automator.testing import WorkflowRunner

# --- step types: sync, async, blocking --------------------------------------------------


class CountConfig(StepConfig):
    count: int = Field(5, description="How many items.")


class AsyncCount(FetchStep[CountConfig]):
    name = "lifecycle.fetch"

    async def fetch(self) -> list[dict[str, Any]]:
        await asyncio.sleep(0)
        return [{"n": i} for i in range(self.config.count)]


class SquareSync(TransformStep[StepConfig]):
    """A plain function: runs inline on the event loop."""

    name = "lifecycle.square"

    def transform(self, item: Item) -> dict[str, Any]:
        return {**item.data, "square": item.data["n"] ** 2, "thread": threading.current_thread().name}


class SlowAsync(TransformStep[StepConfig]):
    """A coroutine: many items wait at once (up to the step's concurrency)."""

    name = "lifecycle.slow"
    default_concurrency = 10

    async def transform(self, item: Item) -> dict[str, Any]:
        await asyncio.sleep(0.2)
        return item.data


class OddOnly(ValidateStep[StepConfig]):
    name = "lifecycle.odd"

    async def validate(self, item: Item) -> None:
        if item.data["n"] % 2 == 0 and item.data["n"] > 0:
            raise QuarantineItem(f"{item.data['n']} is even")


class BlockingDeliver(DeliverStep[StepConfig]):
    """Plain but blocking (``time.sleep``): runs in worker threads, several at once."""

    name = "lifecycle.deliver"
    blocking = True
    default_concurrency = 10
    threads: set[str] = set()

    def deliver(self, item: Item) -> None:
        time.sleep(0.2)
        BlockingDeliver.threads.add(threading.current_thread().name)


class Steps:
    @hookimpl
    def register_step_types(self, register: Any) -> None:
        for step_type in (AsyncCount, SquareSync, SlowAsync, OddOnly, BlockingDeliver):
            register(step_type)


class Listener:
    """Implements every lifecycle hook and keeps what it heard."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, Any]] = []

    @hookimpl
    def run_started(self, event: RunStarted) -> None:
        self.heard.append(("run_started", event))

    @hookimpl
    def step_started(self, event: StepStarted) -> None:
        self.heard.append(("step_started", event))

    @hookimpl
    def step_finished(self, event: StepFinished) -> None:
        self.heard.append(("step_finished", event))

    @hookimpl
    def item_outcome(self, event: ItemOutcome) -> None:
        self.heard.append(("item_outcome", event))

    @hookimpl
    def run_finished(self, event: RunFinished) -> None:
        self.heard.append(("run_finished", event))


WORKFLOW = """
name: lifecycle
steps:
  - {id: numbers, uses: lifecycle.fetch, with: {count: 5}, key: "n{{ item.n }}"}
  - {id: square, uses: lifecycle.square}
  - {id: odd, uses: lifecycle.odd}
  - {id: out, uses: test.deliver, with: {fail_when: "{{ item.n == 3 }}"}}
"""


def test_every_lifecycle_hook_hears_the_run_in_order(automator_runner: WorkflowRunner) -> None:
    listener = Listener()

    result = automator_runner.run(WORKFLOW, plugins=[Steps(), listener])

    kinds = [kind for kind, _ in listener.heard]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    started = [e for k, e in listener.heard if k == "step_started"]
    finished = [e for k, e in listener.heard if k == "step_finished"]
    assert [e.step_id for e in started] == [e.step_id for e in finished] == ["numbers", "square", "odd", "out"]
    # items stream through the steps: a step starts when the first items reach it, and
    # step_finished has its totals
    assert [(e.step_type, e.phase) for e in started] == [
        ("lifecycle.fetch", "fetch"),
        ("lifecycle.square", "transform"),
        ("lifecycle.odd", "validate"),
        ("test.deliver", "deliver"),
    ]
    assert started[0].items_in == 0 and started[1].items_in == 5
    assert [e.items_in for e in finished] == [0, 5, 5, 3]
    assert [(e.status, e.items_out) for e in finished] == [
        ("succeeded", 5),
        ("succeeded", 5),
        ("succeeded", 3),
        ("succeeded", 2),
    ]
    # each item's outcome exactly once, and the same as the ledger's
    outcomes = {e.key: (e.outcome, e.step_id) for k, e in listener.heard if k == "item_outcome"}
    assert len([k for k in kinds if k == "item_outcome"]) == 5
    assert outcomes == {
        "n0": ("delivered", "out"),
        "n1": ("delivered", "out"),
        "n2": ("quarantined", "odd"),
        "n3": ("failed", "out"),
        "n4": ("quarantined", "odd"),
    }
    assert {i.key: (i.outcome, i.step_id) for i in result.items} == outcomes
    # the run's identity is the same everywhere, and the end says how it went
    run_finished = listener.heard[-1][1]
    assert {e.run.id for _, e in listener.heard} == {result.run.id}
    assert run_finished.status == "failed" == result.status
    assert run_finished.counts == {"fetched": 5, "delivered": 2, "skipped": 0, "quarantined": 2, "failed": 1}
    assert run_finished.error == result.error and "fail_when" in (run_finished.error or "")
    assert listener.heard[0][1].run.workflow == "lifecycle"
    assert listener.heard[0][1].run.trigger == "test"
    # the fixture's own recorder heard the same events, in the same order
    assert result.events == [event for _, event in listener.heard]


def test_a_failing_listener_is_logged_and_the_run_goes_on(
    automator_runner: WorkflowRunner, caplog: pytest.LogCaptureFixture
) -> None:
    class Faulty:
        @hookimpl
        def run_started(self, event: RunStarted) -> None:
            raise RuntimeError("notifier down")

        @hookimpl
        def item_outcome(self, event: ItemOutcome) -> None:
            raise RuntimeError("notifier still down")

    listener = Listener()

    with caplog.at_level(logging.WARNING, logger="automator.plugins.manager"):
        result = automator_runner.run(WORKFLOW, plugins=[Steps(), Faulty(), listener])

    assert result.run.status == "failed"  # failed because of item n3, as without the faulty plugin
    assert result.outcomes == {"delivered": 2, "skipped": 0, "quarantined": 2, "failed": 1}
    assert len([k for k, _ in listener.heard if k == "item_outcome"]) == 5
    messages = [r.getMessage() for r in caplog.records]
    assert "plugin Faulty: run_started listener failed: RuntimeError: notifier down" in messages[0]
    assert sum("item_outcome listener failed" in m for m in messages) == 5


def test_sync_steps_run_inline_and_blocking_ones_in_threads(automator_runner: WorkflowRunner) -> None:
    BlockingDeliver.threads.clear()

    started = time.monotonic()
    result = automator_runner.run(
        """
        steps:
          - {id: numbers, uses: lifecycle.fetch, with: {count: 8}}
          - {id: square, uses: lifecycle.square}
          - {id: out, uses: lifecycle.deliver}
        """,
        plugins=[Steps()],
    )
    elapsed = time.monotonic() - started

    assert result.outcomes["delivered"] == 8
    items = result.items_with("delivered")
    assert [i.result["square"] for i in items] == [0, 1, 4, 9, 16, 25, 36, 49]
    assert {i.result["thread"] for i in items} == {"MainThread"}  # inline, on the loop's thread
    assert BlockingDeliver.threads and "MainThread" not in BlockingDeliver.threads
    # 8 blocking deliveries of 0.2 s, up to 10 at once: far less than 8 x 0.2 s
    assert elapsed < 1.2, elapsed


def test_async_steps_wait_concurrently(automator_runner: WorkflowRunner) -> None:
    result = automator_runner.run(
        """
        steps:
          - {id: numbers, uses: lifecycle.fetch, with: {count: 20}}
          - {id: slow, uses: lifecycle.slow}
          - {id: out, uses: test.deliver}
        """,
        plugins=[Steps()],
    )

    assert result.outcomes["delivered"] == 20
    # 20 items x 0.2 s, 10 at a time: about 0.4 s, not 4 s
    assert result.step("slow").finished_at is not None
    assert (result.step("slow").finished_at - result.step("slow").started_at).total_seconds() < 1.5


def test_concurrency_of_one_runs_async_items_one_by_one(automator_runner: WorkflowRunner) -> None:
    result = automator_runner.run(
        """
        steps:
          - {id: numbers, uses: lifecycle.fetch, with: {count: 3}}
          - {id: slow, uses: lifecycle.slow, concurrency: 1}
          - {id: out, uses: test.deliver}
        """,
        plugins=[Steps()],
    )

    step = result.step("slow")
    assert step.finished_at is not None
    assert (step.finished_at - step.started_at).total_seconds() >= 0.6


@pytest.mark.anyio
async def test_arun_from_async_tests(automator_runner: WorkflowRunner) -> None:
    result = await automator_runner.arun(
        "steps:\n  - {id: a, uses: test.fetch, with: {items: [1, 2]}}\n  - {id: out, uses: test.deliver}\n"
    )

    assert result.delivered["out"] == [{"value": 1}, {"value": 2}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
