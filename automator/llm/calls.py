"""The model-call service a model step uses: budget, response cache, call records, one request per answer.

``ModelCalls`` is what a model step (``openai.transform`` in both its modes, or a plugin's
own model step) needs around the request it sends:

- ``upper_bound`` / ``reserve`` / ``settle``: the run's budget, reserved at a call's upper
  bound before it is sent and settled at its real cost afterwards;
- ``lookup`` / ``store``: the response cache;
- ``sent`` / ``record`` / ``record_cached``: the call's ``model_calls`` row, written ahead:
  ``sent`` (with the upper bound) is durable before the request leaves, and ``record``
  gives it its usage, exact cost and status — with the answer's cache entry, in the same
  commit — before the answer is handed on. Nothing waits in memory to be written: a
  crash loses no paid call (recovery turns a ``sent`` row whose answer was lost into
  ``unconfirmed`` at its bound, see ``ModelCallHistory.confirm_lost``);
- ``once``: single flight: identical requests in flight at the same time are sent once,
  the others wait for that answer (or, if it failed, the next one asks in its place);
- ``answer``: a model's accepted answer, redacted through the run's secrets before it is
  cached, recorded or handed on.

The writes go through the history's group commit, so the calls of concurrent items share
transactions. The step keeps what is its own: the prompt, the client, its retries and its checks.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from automator.history.states import CallStatus
from automator.llm import budget as budgets
from automator.llm import pricing, records

if TYPE_CHECKING:
    from automator.engine.context import RunContext
    from automator.history.protocols import ModelCallStore

Answer = dict[str, Any]
LOST = "sent, but the answer never reached the step (cancelled or failed in flight); costed at its upper bound"


@dataclass
class Reply:
    """What the model answered to one request."""

    content: str | None
    refusal: str | None
    finish_reason: str | None
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    request_id: str | None
    latency_ms: int
    headers: dict[str, str]
    model: str | None = None


class ModelCalls:
    """One model step's calls in one run; shared by its concurrent items (one event loop)."""

    def __init__(
        self, context: RunContext, step_id: str, *, model: str, prices: pricing.ModelFacts, store_prompts: bool
    ) -> None:
        self.context = context
        self.step_id = step_id
        self.model = model
        self.prices = prices
        self.store_prompts = store_prompts
        self.history: ModelCallStore = context.history.model_calls
        self.stats: Counter[str] = Counter()
        self.cost = Decimal(0)
        self._budget: budgets.Budget | None = None
        self._inflight: dict[str, asyncio.Future[Answer | None]] = {}
        # keys whose answer is durable in the cache (written with their call): not written twice
        self._cached_keys: set[str] = set()

    @property
    def resumed(self) -> bool:
        info = self.context.info
        return bool(info.resumed or info.trigger == "resume")

    # -- the budget --------------------------------------------------------------------

    @property
    def budget(self) -> budgets.Budget:
        if self._budget is None:
            self._budget = budgets.for_run(self.context)
        return self._budget

    def upper_bound(self, prompt_tokens: int, max_output_tokens: int, *, batch: bool = False) -> Decimal:
        """The most one request can cost: no cache discount, every output token used."""
        return pricing.upper_bound(
            self.prices, input_tokens=prompt_tokens, max_output_tokens=max_output_tokens, batch=batch
        )

    def reserve(self, amount: Decimal) -> None:
        """Hold ``amount`` of the run's budget; raises BudgetExceeded (not sent) when it would pass."""
        self.budget.reserve(amount)

    def settle(self, reserved: Decimal, actual: Decimal) -> None:
        self.budget.settle(reserved, actual)

    def cost_of(self, reply: Reply, *, batch: bool = False) -> Decimal:
        return pricing.cost(
            self.prices,
            input_tokens=reply.input_tokens,
            cached_input_tokens=reply.cached_input_tokens,
            output_tokens=reply.output_tokens,
            batch=batch,
        )

    # -- the response cache ------------------------------------------------------------

    async def lookup(self, key: str, *, this_run_only: bool = False) -> Answer | None:
        """The stored answer to this exact request; ``this_run_only``: one this run paid for."""
        found = await self.history.lookup(key, run_id=self.context.run_id if this_run_only else None)
        # redacted on the way out too: an entry written before a secret was known to the run
        return None if found is None else {**found, "content": self.redact(found.get("content"))}

    def _cache_entry(self, key: str, answer: Answer) -> dict[str, Any]:
        return records.cache_entry(
            key, model=self.model, workflow=self.context.workflow.name, step_id=self.step_id, response=answer
        )

    async def store(self, key: str, answer: Answer) -> None:
        """The answer into the response cache, durable when this returns (unless its call wrote it)."""
        if key in self._cached_keys:
            return
        await self.store_answer(key, answer)

    async def store_answer(self, key: str, answer: Answer) -> None:
        await self.history.store_answer(self._cache_entry(key, answer))
        self._cached_keys.add(key)

    def redact(self, text: str | None) -> str | None:
        return self.context.redactor.text(text)

    def answer(self, reply: Reply, text: str) -> Answer:
        """An accepted answer as it is cached and handed on: its text redacted through the run's secrets."""
        return {
            "content": self.redact(text),
            "finish_reason": reply.finish_reason,
            "request_id": reply.request_id,
            "usage": {
                "input_tokens": reply.input_tokens,
                "cached_input_tokens": reply.cached_input_tokens,
                "output_tokens": reply.output_tokens,
            },
        }

    # -- single flight -----------------------------------------------------------------

    async def once(
        self, key: str, item_seq: int, ask: Callable[[], Awaitable[Answer]], *, cache: bool = True
    ) -> Answer:
        """The answer to the request ``key``: from the cache, from an identical request in flight, or ``ask()``.

        The leader registers itself before its first await (the cache lookup included), so
        no identical request can slip in between the lookup and the cache write. If the
        leader fails, the next waiting item asks in its place. ``cache`` False: ask, except
        on a resumed run for an answer this run already paid for (the answer is still
        stored: a resumed run reads it at any temperature). The answer is durable in the
        cache, with its call, before it is returned.
        """
        if not cache:
            found = await self.lookup(key, this_run_only=True) if self.resumed else None
            if found is not None:
                await self.record_cached(item_seq, found)
                return found
            fresh = await ask()
            await self.store(key, fresh)
            return fresh
        while (leading := self._inflight.get(key)) is not None:
            shared = await asyncio.shield(leading)
            if shared is not None:
                await self.record_cached(item_seq, shared)
                return shared
        future: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        answer: Answer | None = None
        try:
            answer = await self.lookup(key)
            if answer is not None:
                await self.record_cached(item_seq, answer)
                return answer
            answer = await ask()
            await self.store(key, answer)
            return answer
        finally:
            self._inflight.pop(key, None)
            future.set_result(answer)

    # -- the history -------------------------------------------------------------------

    async def record_cached(self, item_seq: int, answer: Answer) -> None:
        self.stats["cached"] += 1
        await self.record(
            item_seq, 0, reply=None, status=CallStatus.CACHED, mode="cache", request_id=answer.get("request_id")
        )

    async def sent(
        self, item_seq: int, attempt: int, *, bound: Decimal, request_key: str | None = None, mode: str = "sync"
    ) -> int:
        """The call's row before its request leaves: ``sent``, at most ``bound``; its id once durable."""
        return await self.history.call_sent(
            run_id=self.context.run_id,
            workflow=self.context.workflow.name,
            step_id=self.step_id,
            item_seq=item_seq,
            attempt=attempt,
            model=self.model[:100],
            mode=mode,
            cost_usd=Decimal(0),
            cost_bound_usd=bound,
            request_key=request_key,
        )

    async def lost(self, call_id: int, bound: Decimal) -> None:
        """A sent call whose answer this process will never read: unconfirmed, at its bound."""
        self.cost += bound
        await self.history.call_ended(call_id, {"status": CallStatus.UNCONFIRMED, "cost_usd": bound, "error": LOST})

    async def record(
        self,
        item_seq: int,
        attempt: int,
        *,
        reply: Reply | None,
        status: CallStatus,
        call_id: int | None = None,
        mode: str = "sync",
        error: str | None = None,
        latency_ms: int | None = None,
        request_id: str | None = None,
        prompt: Any = None,
        response: Any = None,
        request_key: str | None = None,
        answer: Answer | None = None,
    ) -> Decimal:
        """One attempt's result, durable when this returns; its cost (batch prices in mode batch).

        ``call_id``: the attempt's ``sent`` row, which gets the result (else a new row).
        ``answer`` with ``request_key``: the accepted answer, cached in the same commit.
        """
        redact = self.context.redactor
        cost = self.cost_of(reply, batch=mode == "batch") if reply is not None else Decimal(0)
        self.cost += cost
        fields: dict[str, Any] = dict(
            model=(reply.model if reply and reply.model else self.model)[:100],
            status=status,
            input_tokens=reply.input_tokens if reply else 0,
            cached_input_tokens=reply.cached_input_tokens if reply else 0,
            output_tokens=reply.output_tokens if reply else 0,
            cost_usd=cost,
            latency_ms=reply.latency_ms if reply else latency_ms,
            request_id=reply.request_id if reply else request_id,
            error=redact.text(error),
            prompt=redact.data(prompt) if self.store_prompts else None,
            response=redact.data(response) if self.store_prompts else None,
        )
        if request_key is not None:
            fields["request_key"] = request_key
        if call_id is None:
            fields.update(
                run_id=self.context.run_id,
                workflow=self.context.workflow.name,
                step_id=self.step_id,
                item_seq=item_seq,
                attempt=attempt,
                mode=mode,
            )
        cache = None
        if answer is not None and request_key is not None:
            cache = self._cache_entry(request_key, answer)
        await self.history.call_ended(call_id, fields, cache)
        if cache is not None and request_key is not None:
            self._cached_keys.add(request_key)
        return cost

    async def close(self) -> None:
        """The step is done: a call of it still ``sent`` will get no answer (unconfirmed, at its bound)."""
        lost = await asyncio.to_thread(self.history.confirm_lost, self.context.run_id, step_id=self.step_id)
        if lost:
            self.stats["unconfirmed"] += lost
