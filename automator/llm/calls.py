"""The model-call service a model step uses: budget, response cache, call records, one request per answer.

``ModelCalls`` is what a model step (``openai.transform`` in both its modes, or a plugin's
own model step) needs around the request it sends:

- ``upper_bound`` / ``reserve`` / ``settle``: the run's budget, reserved at a call's upper
  bound before it is sent and settled at its real cost afterwards;
- ``lookup`` / ``store``: the response cache (answers not yet written included);
- ``record`` / ``record_cached``: one ``model_calls`` row per attempt, with its exact cost;
- ``once``: single flight: identical requests in flight at the same time are sent once,
  the others wait for that answer (or, if it failed, the next one asks in its place);
- ``answer``: a model's accepted answer, redacted through the run's secrets before it is
  cached, recorded or handed on.

The step keeps what is its own: the prompt, the client, its retries and its checks.
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

Answer = dict[str, Any]


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
        self.recorder = records.CallRecorder(context.history.model_calls)
        self.stats: Counter[str] = Counter()
        self.cost = Decimal(0)
        self._budget: budgets.Budget | None = None
        self._inflight: dict[str, asyncio.Future[Answer | None]] = {}

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

    async def lookup(self, key: str) -> Answer | None:
        """An answer to this exact request: written this run and not yet flushed, or in the history."""
        found = self.recorder.pending_cache(key) or await asyncio.to_thread(
            self.context.history.model_calls.cached_response, key
        )
        # redacted on the way out too: an entry written before a secret was known to the run
        return None if found is None else {**found, "content": self.redact(found.get("content"))}

    def store(self, key: str, answer: Answer) -> None:
        self.recorder.cache(
            key, model=self.model, workflow=self.context.workflow.name, step_id=self.step_id, response=answer
        )

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
        leader fails, the next waiting item asks in its place. ``cache`` False: always ask (the
        answer is still stored: a resumed run reads it at any temperature).
        """
        if not cache:
            fresh = await ask()
            self.store(key, fresh)
            return fresh
        while (leading := self._inflight.get(key)) is not None:
            shared = await asyncio.shield(leading)
            if shared is not None:
                self.record_cached(item_seq, shared)
                return shared
        future: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        answer: Answer | None = None
        try:
            answer = await self.lookup(key)
            if answer is not None:
                self.record_cached(item_seq, answer)
                return answer
            answer = await ask()
            self.store(key, answer)
            return answer
        finally:
            self._inflight.pop(key, None)
            future.set_result(answer)

    # -- the history -------------------------------------------------------------------

    def record_cached(self, item_seq: int, answer: Answer) -> None:
        self.stats["cached"] += 1
        self.record(
            item_seq, 0, reply=None, status=CallStatus.CACHED, mode="cache", request_id=answer.get("request_id")
        )

    def record(
        self,
        item_seq: int,
        attempt: int,
        *,
        reply: Reply | None,
        status: CallStatus,
        mode: str = "sync",
        error: str | None = None,
        latency_ms: int | None = None,
        request_id: str | None = None,
        prompt: Any = None,
        response: Any = None,
    ) -> Decimal:
        """One attempt's row (written in the background); returns its cost (batch prices in mode batch)."""
        redact = self.context.redactor
        cost = self.cost_of(reply, batch=mode == "batch") if reply is not None else Decimal(0)
        self.cost += cost
        self.recorder.call(
            run_id=self.context.run_id,
            workflow=self.context.workflow.name,
            step_id=self.step_id,
            item_seq=item_seq,
            attempt=attempt,
            model=(reply.model if reply and reply.model else self.model)[:100],
            mode=mode,
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
        return cost

    async def flush(self) -> None:
        await self.recorder.flush()

    async def close(self) -> None:
        await self.recorder.close()
