"""Items stream through the steps in chunks; the chunk is the unit of work and of recovery."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from pydantic import Field

from automator import DeliverStep, FetchStep, History, Item, StepConfig, TransformStep, hookimpl
from automator.history.rows import ChunkRow
from automator.history.states import ChunkStatus
from automator.testing import WorkflowRunner

# --- a paginated source whose second page waits for the first delivery --------------------


class PagesConfig(StepConfig):
    pages: int = Field(3, description="How many pages.")
    per_page: int = Field(5, description="Items per page.")


FIRST_DELIVERY: dict[str, asyncio.Event] = {}


class PagedFetch(FetchStep[PagesConfig]):
    """Yields a page, then waits until an item of it was delivered before fetching the next."""

    name = "chunks.pages"

    async def fetch(self) -> Any:
        delivered = FIRST_DELIVERY.setdefault("event", asyncio.Event())
        for page in range(self.config.pages):
            for n in range(self.config.per_page):
                yield {"page": page, "n": n}
            if page == 0:
                # a fetch that handed over its whole list first would wait here for ever
                await asyncio.wait_for(delivered.wait(), timeout=10)


class Collect(DeliverStep[StepConfig]):
    name = "chunks.collect"
    received: list[dict[str, Any]] = []

    async def deliver(self, item: Item) -> None:
        Collect.received.append(item.data)
        FIRST_DELIVERY.setdefault("event", asyncio.Event()).set()


class Slow(TransformStep[StepConfig]):
    """A model-like step: waits, so several items are at it at once."""

    name = "chunks.slow"
    default_concurrency = 4

    async def transform(self, item: Item) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {**item.data, "slow": True}


class Steps:
    @hookimpl
    def register_step_types(self, register: Any) -> None:
        for step_type in (PagedFetch, Collect, Slow):
            register(step_type)


def test_the_first_page_is_delivered_while_the_fetch_goes_on(automator_runner: WorkflowRunner) -> None:
    FIRST_DELIVERY.clear()
    Collect.received = []
    result = automator_runner.run(
        """
        name: paged
        steps:
          - {id: read, uses: chunks.pages, with: {pages: 3, per_page: 5}, key: "{{ item.page }}-{{ item.n }}"}
          - {id: shape, uses: chunks.slow}
          - {id: send, uses: chunks.collect}
        """,
        plugins=[Steps()],
    )
    assert result.status == "succeeded", result.error
    assert result.outcomes["delivered"] == 15
    assert sorted((d["page"], d["n"]) for d in Collect.received) == [(p, n) for p in range(3) for n in range(5)]
    assert result.step("read").items_out == 15


def test_a_run_is_cut_into_chunks_that_all_end_done(automator_runner: WorkflowRunner) -> None:
    Collect.received = []
    FIRST_DELIVERY.clear()
    FIRST_DELIVERY["event"] = asyncio.Event()
    FIRST_DELIVERY["event"].set()
    result = automator_runner.run(
        """
        name: chunked
        chunk_size: 4
        chunks_in_flight: 2
        steps:
          - {id: read, uses: chunks.pages, with: {pages: 2, per_page: 5}}
          - {id: send, uses: chunks.collect}
        """,
        plugins=[Steps()],
    )
    assert result.status == "succeeded", result.error
    chunks = automator_runner.history.ledger.chunk_rows(result.run.id)
    # consecutive items, at most 4 per chunk (a chunk may end early, at a page's end)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [c.first for c in chunks] == [0, *(sum(c.size for c in chunks[:i]) for i in range(1, len(chunks)))]
    assert sum(c.size for c in chunks) == 10 and max(c.size for c in chunks) == 4
    assert {c.status for c in chunks} == {ChunkStatus.DONE}
    assert {c.owner for c in chunks} == {None}  # every lease given back


def test_the_default_chunk_size_is_100(automator_runner: WorkflowRunner) -> None:
    FIRST_DELIVERY.clear()
    FIRST_DELIVERY["event"] = asyncio.Event()
    FIRST_DELIVERY["event"].set()
    result = automator_runner.run(
        """
        name: defaults
        steps:
          - {id: read, uses: chunks.pages, with: {pages: 1, per_page: 250}}
          - {id: send, uses: chunks.collect}
        """,
        plugins=[Steps()],
    )
    assert result.status == "succeeded", result.error
    assert [c.size for c in automator_runner.history.ledger.chunk_rows(result.run.id)] == [100, 100, 50]


# --- leases: a chunk is claimed once --------------------------------------------------------


def _open_run(history: History) -> int:
    run = history.start_run(workflow="leases", version="v", path=None, trigger="test", owner="a:1")
    return run.id


def test_a_second_claim_of_a_chunk_does_nothing(history: History) -> None:
    run_id = _open_run(history)
    ledger = history.ledger
    lease = timedelta(minutes=5)

    async def scenario() -> list[bool]:
        await ledger.add_chunk(run_id, "leases", ChunkRow(0, 0, 0, "read", ChunkStatus.OPEN), [], timedelta(0))
        first = await ledger.claim(run_id, 0, "worker:1", lease)
        second = await ledger.claim(run_id, 0, "worker:2", lease)
        # the holder's process is known dead (crash recovery): its leases end, and the chunk
        # can be taken again, once
        await ledger.release(run_id, "worker:1")
        third, fourth = await asyncio.gather(
            ledger.claim(run_id, 0, "worker:3", lease), ledger.claim(run_id, 0, "worker:4", lease)
        )
        return [first, second, third, fourth]

    assert asyncio.run(scenario()) == [True, False, True, False]
    (chunk,) = ledger.chunk_rows(run_id)
    assert chunk.owner == "worker:3"


def test_an_expired_lease_can_be_claimed_and_a_done_chunk_never(history: History) -> None:
    run_id = _open_run(history)
    ledger = history.ledger

    async def scenario() -> list[bool]:
        for seq in (0, 1):
            row = ChunkRow(seq, seq * 10, 10, "read", ChunkStatus.OPEN)
            await ledger.add_chunk(run_id, "leases", row, [], timedelta(0))
        expired = await ledger.claim(run_id, 0, "worker:1", timedelta(seconds=-1))  # a lease already over
        taken_over = await ledger.claim(run_id, 0, "worker:2", timedelta(minutes=5))
        await ledger.finish_chunk(run_id, 1, [])
        done = await ledger.claim(run_id, 1, "worker:2", timedelta(minutes=5))
        return [expired, taken_over, done]

    assert asyncio.run(scenario()) == [True, True, False]


# --- a deliverer that finishes its delivery in close() ----------------------------------------


class Assembles(DeliverStep[StepConfig]):
    """Like file.deliver: takes chunks, finishes the delivery in close(); here close() fails."""

    name = "chunks.assembles"

    def deliver_batch(self, items: list[Item]) -> None:
        pass

    async def close(self) -> None:
        raise RuntimeError("disk full while assembling")


class AssemblingSteps:
    @hookimpl
    def register_step_types(self, register: Any) -> None:
        register(Assembles)


def test_a_delivery_that_cannot_finish_in_close_fails_the_run(automator_runner: WorkflowRunner) -> None:
    FIRST_DELIVERY.clear()
    FIRST_DELIVERY["event"] = asyncio.Event()
    FIRST_DELIVERY["event"].set()
    result = automator_runner.run(
        """
        name: assembling
        steps:
          - {id: read, uses: chunks.pages, with: {pages: 1, per_page: 3}}
          - {id: write, uses: chunks.assembles}
        """,
        plugins=[Steps(), AssemblingSteps()],
    )
    assert result.status == "failed"
    assert result.error is not None and "disk full while assembling" in result.error
    assert result.step("write").status == "failed"
