"""Digests: a deliver step with ``group:`` delivers its items in groups, one delivery per group.

Items reaching the step join the open group of their ``group.by`` value; a group is sent
when it holds ``group.size`` items, or when no more items can join it: every chunk in
flight waits at a group step and no other chunk can start (the fetch is done, or the
chunks in flight are as many as allowed). Groups may take items of several chunks; a chunk
goes on when the groups of all its items are delivered.

The step is called once per group, with one item standing for the group: its data is
``{"items": [...], "group": <by value>, "count": n}``, its ``members`` the items, so the
step's templates see ``items`` and ``group``. The group's key is made from its members'
keys and written with the delivery's intent on every member, before the call: a resumed
run sends a group that was in flight again with the same members and the same
idempotency key. Every member ends with the group's outcome.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from automator.engine.drivers import ItemDriver
from automator.engine.recorder import Ending
from automator.errors import AutomatorError
from automator.history.states import Outcome
from automator.plugins.steps import Item, Shape

if TYPE_CHECKING:
    from automator.engine.pipeline import Chunk

# what a group's delivery did for each member: an ending, or None (it goes on to later steps)
Results = dict[int, Ending | None]


@dataclass
class _Group:
    by: Any
    sealed_key: str | None = None  # a group in flight when a run's process died: its key as written
    members: list[tuple[Item, Chunk]] = field(default_factory=list)
    done: asyncio.Future[Results] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupDeliverDriver(ItemDriver):
    """A deliver step with ``group:``: its items in groups, each group one delivery, written ahead."""

    shape = Shape.PER_ITEM  # driven in groups whatever the step type's own shape

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        spec = self.bound.spec.group
        assert spec is not None
        self.size = spec.size
        self.by = spec.by
        concurrency = self.bound.spec.concurrency or self.bound.type.default_concurrency
        self.slots = asyncio.Semaphore(concurrency)
        self.filling: dict[str, _Group] = {}  # by value (as JSON) -> the open group
        self.sealed: dict[str, _Group] = {}  # group key -> a group in flight at a crash
        self.sends: set[asyncio.Task[None]] = set()
        self.parked = 0  # chunks waiting here for their groups
        self.waiting_items = 0  # items in groups not sent yet
        self.park_limit = 10 * self.size  # more waiting items than this: the open groups go (set by the pipeline)
        self.on_park: Callable[[], None] = lambda: None  # the pipeline: may the open groups go now?

    async def collect(self, items: list[Item], chunk: Chunk) -> list[Ending | None]:
        """The chunk's items into groups; returns when every group they joined was delivered."""
        if not items:
            return []
        ended: Results = {}
        waits: dict[int, _Group] = {}
        for item in items:
            sealed_key = chunk.groups.get(item.seq)
            if sealed_key is not None:
                group = self.sealed.setdefault(sealed_key, _Group(None, sealed_key))
            else:
                try:
                    by = self.recorder.context.render(self.by, item) if self.by is not None else None
                except AutomatorError as exc:
                    ended[item.seq] = Ending(item, Outcome.FAILED, self.bound.id, f"group.by: {exc.message}", item.data)
                    continue
                label = json.dumps(by, sort_keys=True, default=str)
                group = self.filling.setdefault(label, _Group(by))
            group.members.append((item, chunk))
            self.waiting_items += 1
            waits[id(group)] = group
            if group.sealed_key is None and len(group.members) >= self.size:
                del self.filling[json.dumps(group.by, sort_keys=True, default=str)]
                self._send(group)
        self.parked += 1
        self.on_park()
        try:
            results = await asyncio.gather(*(g.done for g in waits.values()))
        finally:
            self.parked -= 1
        for found in results:
            ended.update(found)
        return [ended.get(item.seq) for item in items]

    def flush(self) -> None:
        """No more items can join: the open groups go as they are."""
        groups = [*self.sealed.values(), *self.filling.values()]
        self.sealed, self.filling = {}, {}
        for group in groups:
            self._send(group)

    def abandon(self) -> None:
        """The run stops: groups not sent are not sent (their items end with the run)."""
        groups = [*self.sealed.values(), *self.filling.values()]
        self.sealed, self.filling = {}, {}
        for group in groups:
            self.waiting_items -= len(group.members)
            if not group.done.done():
                group.done.set_result({})

    async def cancel(self) -> None:
        for task in list(self.sends):
            task.cancel()
        await asyncio.gather(*self.sends, return_exceptions=True)

    def _send(self, group: _Group) -> None:
        self.waiting_items -= len(group.members)
        task = asyncio.get_running_loop().create_task(self._deliver(group))
        self.sends.add(task)
        task.add_done_callback(self.sends.discard)

    def group_key(self, group: _Group) -> str:
        """The group's identity: the same members give the same key in every run and retry."""
        if group.sealed_key is not None:
            return group.sealed_key
        run_id = self.recorder.run_id
        names = sorted(i.key if i.key is not None else f"run-{run_id}-item-{i.seq}" for i, _ in group.members)
        return "g-" + hashlib.sha256("\0".join(names).encode()).hexdigest()[:32]

    async def _deliver(self, group: _Group) -> None:
        try:
            group.done.set_result(await self._deliver_group(group))
        except BaseException as exc:
            if not group.done.done():
                group.done.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    async def _deliver_group(self, group: _Group) -> Results:
        # in item order, whichever chunk came first: a group sent again after a crash is the same message
        members = sorted((item for item, _ in group.members), key=lambda i: i.seq)
        key = self.group_key(group)
        first = members[0]
        by = group.by if group.sealed_key is None else self._by_of(first)
        digest = Item(
            seq=first.seq,
            data={"items": [m.data for m in members], "group": by, "count": len(members)},
            key=key,
            members=members,
        )
        async with self.slots:
            await self.open(len(members))
            self.record.items_in += len(members)
            await self.recorder.sending(self.bound, members, key)
            try:
                await self.caller.call(self._method(), digest)
            except Exception as exc:  # noqa: BLE001 - every member ends so, recorded before the slot frees
                # a SkipItem or QuarantineItem from the step ends every member that way; anything else fails them
                endings = [self._signal(m, exc) for m in members]
                for ending in endings:
                    ending.recorded = True
                await self.recorder.ended(endings)
                return {e.item.seq: e for e in endings}
        for member in members:
            member.steps = {**member.steps, self.bound.id: member.data}
        if self.last:
            reason = f"in digest {key} ({len(members)} items)"
            endings = [Ending(m, Outcome.DELIVERED, self.bound.id, reason, m.data, recorded=True) for m in members]
            await self.recorder.ended(endings)
            return {e.item.seq: e for e in endings}
        by_chunk: dict[int, tuple[Chunk, list[Item]]] = {}
        for item, chunk in group.members:
            by_chunk.setdefault(id(chunk), (chunk, []))[1].append(item)
        for chunk, items in by_chunk.values():
            await self.recorder.passed(self.bound, items, chunk.passed)
        return dict.fromkeys((m.seq for m in members), None)

    def _by_of(self, item: Item) -> Any:
        """A resumed group's ``by`` value, from its first item (None if it cannot be rendered)."""
        try:
            return self.recorder.context.render(self.by, item) if self.by is not None else None
        except AutomatorError:
            return None

    def _method(self) -> Callable[[Item], Any]:
        """The step's ``deliver(item)``, or its ``deliver_batch`` given the one group item."""
        deliver = getattr(type(self.step), "deliver", None)
        if deliver is not None and not _is_base_deliver(deliver):
            return self.step.deliver  # type: ignore[attr-defined]
        batch = self.step.deliver_batch  # type: ignore[attr-defined]

        async def one(item: Item) -> Any:
            result = batch([item])
            return await result if inspect.isawaitable(result) else result

        return one


def _is_base_deliver(method: Any) -> bool:
    from automator.plugins.steps import DeliverStep

    return method is DeliverStep.deliver
