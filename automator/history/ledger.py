"""The item ledger, written ahead: chunks, items, deliveries in flight, outcomes.

Every write here is a *work* (a function of one connection): :class:`Ledger`'s methods
hand them to the group commit (:meth:`History.commit`) and return once they are durable,
so concurrent items share one transaction; the synchronous ``History`` methods run the
same works in a transaction of their own.

The order of writes is the engine's contract with a crash:
- a chunk and its items are written before any step sees them;
- a delivery's intent (``sending``) is written before it leaves, its result (``passed``
  or the item's outcome) before the item moves on;
- a chunk is ``done`` once all its items have outcomes.
A resumed run finds open chunks, claims them, and restarts their pending items; an item
still ``sending`` was in flight and is sent again with the same idempotency key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, bindparam, func, insert, null, or_, select, update

from automator.history.models import Chunk, LedgerItem, StepAttempt
from automator.history.rows import ChunkRow, ItemRow, OutcomeRow, executemany, now
from automator.history.states import ChunkStatus, Outcome, StepStatus

if TYPE_CHECKING:
    from automator.history.store import History

Work = Callable[[Connection], Any]
_ITEMS = LedgerItem.__table__.c
_CHUNKS = Chunk.__table__.c


# -- works: what one write does inside a transaction -------------------------------------


_INSERT_ITEMS = insert(LedgerItem)


def add_items(run_id: int, workflow: str, rows: Sequence[ItemRow]) -> Work:
    stamp = now()
    values = [
        {
            "run_id": run_id,
            "workflow": workflow,
            "seq": r.seq,
            "key": r.key,
            "fetched_by": r.fetched_by,
            "outcome": Outcome.PENDING,
            "data": r.data,
            "updated_at": stamp,
        }
        for r in rows
    ]

    def work(conn: Connection) -> None:
        executemany(conn, _INSERT_ITEMS, values, json_keys=("data",), time_keys=("updated_at",))

    return work


_OUTCOMES = (
    update(LedgerItem)
    .where(LedgerItem.run_id == bindparam("b_run"), LedgerItem.seq == bindparam("b_seq"))
    .values(
        outcome=bindparam("b_outcome"),
        step_id=bindparam("b_step"),
        reason=bindparam("b_reason"),
        result=bindparam("b_result", type_=_ITEMS.result.type),
        sending=null(),
        updated_at=bindparam("b_stamp", type_=_ITEMS.updated_at.type),
    )
)


def set_outcomes(run_id: int, rows: Sequence[OutcomeRow]) -> Work:
    stamp = now()
    values = [
        {
            "b_run": run_id,
            "b_seq": r.seq,
            "b_outcome": r.outcome,
            "b_step": r.step_id,
            "b_reason": r.reason,
            "b_result": r.result,
            "b_stamp": stamp,
        }
        for r in rows
    ]

    def work(conn: Connection) -> None:
        executemany(conn, _OUTCOMES, values, json_keys=("b_result",), time_keys=("b_stamp",))

    return work


_PASSED = (
    update(LedgerItem)
    .where(LedgerItem.run_id == bindparam("b_run"), LedgerItem.seq == bindparam("b_seq"))
    .values(
        delivered_by=bindparam("b_steps", type_=_ITEMS.delivered_by.type),
        sending=null(),
        updated_at=bindparam("b_stamp", type_=_ITEMS.updated_at.type),
    )
)


def set_passed(run_id: int, rows: Sequence[tuple[int, list[str]]]) -> Work:
    """Items still pending passed deliver steps (their whole list each): the result of a delivery."""
    stamp = now()
    values = [{"b_run": run_id, "b_seq": seq, "b_steps": steps, "b_stamp": stamp} for seq, steps in rows]

    def work(conn: Connection) -> None:
        executemany(conn, _PASSED, values, json_keys=("b_steps",), time_keys=("b_stamp",))

    return work


def set_sending(run_id: int, step_id: str, seqs: Sequence[int], group_key: str | None = None) -> Work:
    """The intent of a delivery: these items are (about to be) on their way by ``step_id``
    (together, as the digest ``group_key``, when one is given)."""
    wanted = list(seqs)
    values: dict[str, Any] = {"sending": step_id}
    if group_key is not None:
        values["group_key"] = group_key

    def work(conn: Connection) -> None:
        for start in range(0, len(wanted), 500):
            part = wanted[start : start + 500]
            conn.execute(
                update(LedgerItem).where(LedgerItem.run_id == run_id, LedgerItem.seq.in_(part)).values(**values)
            )

    return work


def add_chunk(run_id: int, chunk: ChunkRow, lease: timedelta) -> Work:
    stamp = now()

    def work(conn: Connection) -> None:
        conn.execute(
            insert(Chunk).values(
                run_id=run_id,
                seq=chunk.seq,
                first_item=chunk.first,
                size=chunk.size,
                fetched_by=chunk.fetched_by,
                status=chunk.status,
                owner=chunk.owner,
                lease_until=stamp + lease if chunk.owner else None,
                claims=1 if chunk.owner else 0,
                fetch_mark=chunk.fetch_mark,
                updated_at=stamp,
            )
        )

    return work


def chunk_done(run_id: int, seq: int) -> Work:
    def work(conn: Connection) -> None:
        conn.execute(
            update(Chunk)
            .where(Chunk.run_id == run_id, Chunk.seq == seq)
            .values(status=ChunkStatus.DONE, owner=None, lease_until=None, updated_at=now())
        )

    return work


def _finish_chunk(run_id: int, seq: int, rows: Sequence[OutcomeRow]) -> Work:
    outcomes = set_outcomes(run_id, rows) if rows else None
    done = chunk_done(run_id, seq)

    def work(conn: Connection) -> None:
        if outcomes is not None:
            outcomes(conn)
        done(conn)

    return work


def claim_chunk(run_id: int, seq: int, owner: str, lease: timedelta, *, at: datetime | None = None) -> Work:
    """Take an open chunk whose lease is free or expired; the work returns False if it was not."""

    def work(conn: Connection) -> bool:
        moment = at or now()
        claimed = conn.execute(
            update(Chunk)
            .where(
                Chunk.run_id == run_id,
                Chunk.seq == seq,
                Chunk.status == ChunkStatus.OPEN,
                or_(Chunk.owner.is_(None), Chunk.lease_until.is_(None), Chunk.lease_until < moment),
            )
            .values(owner=owner, lease_until=moment + lease, claims=Chunk.claims + 1, updated_at=moment)
            .returning(Chunk.id)
        ).first()
        return claimed is not None

    return work


def renew_leases(run_id: int, owner: str, lease: timedelta) -> Work:
    def work(conn: Connection) -> None:
        conn.execute(
            update(Chunk)
            .where(Chunk.run_id == run_id, Chunk.owner == owner, Chunk.status == ChunkStatus.OPEN)
            .values(lease_until=now() + lease)
        )

    return work


def release_chunks(run_id: int, owner: str | None) -> Work:
    """The leases a dead owner held end now (recovery has established that it is gone)."""

    def work(conn: Connection) -> int:
        query = update(Chunk).where(Chunk.run_id == run_id, Chunk.status == ChunkStatus.OPEN)
        if owner is not None:
            query = query.where(Chunk.owner == owner)
        return int(conn.execute(query.values(owner=None, lease_until=None)).rowcount)

    return work


def cover_items(run_id: int, size: int) -> Work:
    """Chunks for a run's pending items that no chunk holds (a run recorded before chunks existed)."""

    def work(conn: Connection) -> int:
        covered = select(Chunk.id).where(
            Chunk.run_id == run_id,
            LedgerItem.seq >= Chunk.first_item,
            LedgerItem.seq < Chunk.first_item + Chunk.size,
        )
        loose = conn.execute(
            select(LedgerItem.seq, LedgerItem.fetched_by)
            .where(LedgerItem.run_id == run_id, LedgerItem.outcome == Outcome.PENDING, ~covered.exists())
            .order_by(LedgerItem.seq)
        ).all()
        if not loose:
            return 0
        next_seq = conn.execute(
            select(func.coalesce(func.max(Chunk.seq) + 1, 0)).where(Chunk.run_id == run_id)
        ).scalar()
        made = 0
        group: list[tuple[int, str]] = []

        def flush() -> None:
            nonlocal next_seq, made
            if group:
                first, last = group[0][0], group[-1][0]
                row = ChunkRow(int(next_seq or 0), first, last - first + 1, group[0][1], ChunkStatus.OPEN)
                add_chunk(run_id, row, timedelta(0))(conn)
                next_seq = int(next_seq or 0) + 1
                made += 1
                group.clear()

        for seq, fetched_by in loose:
            if group and (len(group) >= size or group[-1][1] != fetched_by or seq != group[-1][0] + 1):
                flush()
            group.append((seq, fetched_by))
        flush()
        return made

    return work


# -- reads -------------------------------------------------------------------------------


def open_chunks(conn: Connection, run_id: int, *, every: bool = False) -> list[ChunkRow]:
    query = select(
        Chunk.seq, Chunk.first_item, Chunk.size, Chunk.fetched_by, Chunk.status, Chunk.owner, Chunk.fetch_mark
    ).where(Chunk.run_id == run_id)
    if not every:
        query = query.where(Chunk.status == ChunkStatus.OPEN)
    return [ChunkRow(*row) for row in conn.execute(query.order_by(Chunk.seq))]


def chunk_items(conn: Connection, run_id: int, chunk: ChunkRow) -> list[Any]:
    """The chunk's pending items: seq, key, data, delivered_by, sending, group_key."""
    return list(
        conn.execute(
            select(
                LedgerItem.seq,
                LedgerItem.key,
                LedgerItem.data,
                LedgerItem.delivered_by,
                LedgerItem.sending,
                LedgerItem.group_key,
            )
            .where(
                LedgerItem.run_id == run_id,
                LedgerItem.seq >= chunk.first,
                LedgerItem.seq < chunk.first + chunk.size,
                LedgerItem.outcome == Outcome.PENDING,
            )
            .order_by(LedgerItem.seq)
        )
    )


def finished_steps(conn: Connection, run_id: int) -> set[str]:
    """The steps of the run with an attempt that succeeded (a fetch that got to its end)."""
    query = select(StepAttempt.step_id).where(StepAttempt.run_id == run_id, StepAttempt.status == StepStatus.SUCCEEDED)
    return {step_id for (step_id,) in conn.execute(query.distinct())}


def repeats(
    conn: Connection, run_id: int, workflow: str, keys: Sequence[str], *, delivered: bool
) -> tuple[dict[str, int], dict[str, int]]:
    """For ``keys`` of a new chunk: the run that delivered each (if ``delivered``), and the
    first item of this run with each key (the chunk is written already, so its own items count).
    """
    wanted = list(dict.fromkeys(keys))
    by_run: dict[str, int] = {}
    first: dict[str, int] = {}
    for start in range(0, len(wanted), 500):
        part = wanted[start : start + 500]
        if delivered:
            query = (
                select(LedgerItem.key, func.min(LedgerItem.run_id))
                .where(
                    LedgerItem.workflow == workflow,
                    LedgerItem.outcome == Outcome.DELIVERED,
                    LedgerItem.key.in_(part),
                    LedgerItem.run_id != run_id,
                )
                .group_by(LedgerItem.key)
            )
            by_run.update({key: found for key, found in conn.execute(query) if key is not None})
        query = (
            select(LedgerItem.key, func.min(LedgerItem.seq))
            .where(
                LedgerItem.workflow == workflow,
                LedgerItem.key.in_(part),
                LedgerItem.run_id == run_id,
            )
            .group_by(LedgerItem.key)
        )
        first.update({key: seq for key, seq in conn.execute(query) if key is not None})
    return by_run, first


class Ledger:
    """The write-ahead ledger of one history: each method returns once its write is durable."""

    def __init__(self, history: History) -> None:
        self.history = history

    async def add_chunk(
        self,
        run_id: int,
        workflow: str,
        chunk: ChunkRow,
        items: Sequence[ItemRow],
        lease: timedelta,
        ended: Sequence[OutcomeRow] = (),
    ) -> None:
        """A new chunk and its items, ``pending``, in one transaction (held by ``chunk.owner``);
        ``ended``: outcomes written with it (the item a transform split into these)."""
        rows = add_items(run_id, workflow, items)
        made = add_chunk(run_id, chunk, lease)
        outcomes = set_outcomes(run_id, ended) if ended else None

        def work(conn: Connection) -> None:
            rows(conn)
            made(conn)
            if outcomes is not None:
                outcomes(conn)

        await self.history.commit(work)

    async def sending(self, run_id: int, step_id: str, seqs: Sequence[int], group_key: str | None = None) -> None:
        await self.history.commit(set_sending(run_id, step_id, seqs, group_key))

    async def passed(self, run_id: int, rows: Sequence[tuple[int, list[str]]]) -> None:
        await self.history.commit(set_passed(run_id, rows))

    async def ended(self, run_id: int, rows: Sequence[OutcomeRow]) -> None:
        await self.history.commit(set_outcomes(run_id, rows))

    async def finish_chunk(self, run_id: int, seq: int, rows: Sequence[OutcomeRow]) -> None:
        """The chunk's last outcomes and its end, in one transaction."""
        await self.history.commit(_finish_chunk(run_id, seq, rows))

    async def claim(self, run_id: int, seq: int, owner: str, lease: timedelta) -> bool:
        return bool(await self.history.commit(claim_chunk(run_id, seq, owner, lease)))

    async def renew(self, run_id: int, owner: str, lease: timedelta) -> None:
        await self.history.commit(renew_leases(run_id, owner, lease))

    async def release(self, run_id: int, owner: str | None = None) -> int:
        return int(await self.history.commit(release_chunks(run_id, owner)))

    async def cover(self, run_id: int, size: int) -> int:
        return int(await self.history.commit(cover_items(run_id, size)))

    def counts(self, run_id: int) -> dict[str, int]:
        """The run's items so far: ``fetched``, and how many ended each way."""

        def read(conn: Connection) -> dict[str, int]:
            query = select(LedgerItem.outcome, func.count()).where(LedgerItem.run_id == run_id)
            found = {outcome: int(n) for outcome, n in conn.execute(query.group_by(LedgerItem.outcome))}
            counts = {o.value: found.get(o.value, 0) for o in Outcome if o is not Outcome.PENDING}
            counts["fetched"] = sum(found.values())
            return counts

        return self.history.connect(read)

    def open_chunks(self, run_id: int) -> list[ChunkRow]:
        return self.history.connect(lambda conn: open_chunks(conn, run_id))

    def chunk_rows(self, run_id: int) -> list[ChunkRow]:
        """Every chunk of a run, open or done, in order."""
        return self.history.connect(lambda conn: open_chunks(conn, run_id, every=True))

    def chunk_items(self, run_id: int, chunk: ChunkRow) -> list[Any]:
        return self.history.connect(lambda conn: chunk_items(conn, run_id, chunk))

    def finished_steps(self, run_id: int) -> set[str]:
        return self.history.connect(lambda conn: finished_steps(conn, run_id))

    def repeats(
        self, run_id: int, workflow: str, keys: Sequence[str], *, delivered: bool
    ) -> tuple[dict[str, int], dict[str, int]]:
        return self.history.connect(lambda conn: repeats(conn, run_id, workflow, keys, delivered=delivered))
