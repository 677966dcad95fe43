"""openai.transform: each item through GPT-4o mini (or any OpenAI-compatible model).

Static instructions first and the item last (prompt caching); structured output checked
on return and re-asked with the problem fed back; 429/5xx/timeouts retried under the
step's ``retry:`` policy, honouring retry-after; requests and tokens per minute paced;
every attempt recorded ahead (a row before the request leaves, its usage and exact cost
with the answer's cache entry before the answer moves on); identical requests sent once (the response
cache, and requests in flight); budgets enforced before sending; answers redacted through
the run's secrets. Every path ends in an outcome: a result, a quarantine with the reason,
or a failure with the error — never a lost item.

The settings are in openai_config, ``mode: batch`` in openai_batch, and the budget, cache,
records and single flight in ``automator.llm.calls.ModelCalls``, which both modes share.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from automator import Item, ModelError, QuarantineItem, StepError, TransformStep, hookimpl
from automator.engine.calls import Caller
from automator.history.states import CallStatus
from automator.llm import pricing, tokens
from automator.llm.calls import Answer, ModelCalls, Reply
from automator.llm.limiter import RateLimiter
from automator.spec.models import RetryPolicy
from automator_standard.openai_batch import BatchTransform
from automator_standard.openai_client import CallFailed, TransientModelError, complete, make_client
from automator_standard.openai_config import OpenAITransformConfig
from automator_standard.openai_prompt import (
    Image,
    Prompt,
    build_messages,
    image_from_file,
    image_from_url,
    repair_turns,
    request_key,
)

# the Batch API takes up to 50,000 requests per job
BATCH_CHUNK_SIZE = 50_000


class OpenAITransform(TransformStep[OpenAITransformConfig]):
    name = "openai.transform"
    description = "Transform each item with GPT-4o mini: structured output, retries, exact cost, cache, budgets."
    default_concurrency = 16

    def __init__(self, config: OpenAITransformConfig, context: Any, step_id: str) -> None:
        super().__init__(config, context, step_id)
        self._client: Any = None
        self._setup_lock = asyncio.Lock()
        self.limiter = RateLimiter(rpm=config.rpm, tpm=config.tpm)
        self.prices = pricing.facts(
            config.model,
            pricing.ModelFacts(**config.prices.model_dump()) if config.prices else None,
        )
        self.window = config.context_window or self.prices.context_window
        self.calls = ModelCalls(
            context, step_id, model=config.model, prices=self.prices, store_prompts=config.store_prompts
        )
        self._instructions: str | None = None
        self._fatal: str | None = None

    @property
    def transform_batch(self) -> Any:
        """mode: batch: the engine hands over a chunk of items at once (see openai_batch)."""
        return BatchTransform(self).run if self.config.mode == "batch" else None

    @property
    def chunk_size(self) -> int | None:
        """mode: batch: one Batch API job per chunk, so chunks as big as a job may be."""
        return BATCH_CHUNK_SIZE if self.config.mode == "batch" else None

    # -- set-up -----------------------------------------------------------------------

    @property
    def reads_cache(self) -> bool:
        """Whether answers to identical requests are reused. With ``cache: false`` too, a resumed
        run reuses the answers it paid for before the crash (``ModelCalls.once``)."""
        if self.config.cache is not None:
            return self.config.cache
        # a resumed run must not pay again for answers its crashed predecessor recorded
        return self.config.temperature == 0 or self.resumed

    @property
    def resumed(self) -> bool:
        return bool(self.context.info.resumed or self.context.info.trigger == "resume")

    @property
    def retry(self) -> RetryPolicy:
        """The step's ``retry:`` policy (or the workflow's default): the model step's only retry policy."""
        spec = self.context.workflow.spec
        for step in spec.steps:
            if step.id == self.step_id and step.retry is not None:
                return step.retry
        return spec.defaults.retry

    async def client(self) -> Any:
        if self._client is None:
            async with self._setup_lock:
                if self._client is None:
                    cfg = self.config
                    api_key = self.render_text(cfg.api_key) if cfg.api_key else None
                    base_url = self.render_text(cfg.base_url) if cfg.base_url else None
                    client = make_client(
                        api_key=api_key, base_url=base_url, timeout=cfg.request_timeout.total_seconds()
                    )
                    self.context.add_secret(client.api_key if isinstance(client.api_key, str) else "")
                    self.calls.budget  # noqa: B018 - read the day's spend before the first call, not during
                    self._client = client
        return self._client

    def instructions(self) -> str:
        if self._instructions is None:
            # rendered once, without the item: the static prefix that prompt caching reuses
            self._instructions = str(self.render_text(self.config.instructions))
        return self._instructions

    # -- the prompt -------------------------------------------------------------------

    def prompt(self, item: Item) -> Prompt:
        cfg = self.config
        images: list[Image] = []
        for spec in cfg.images:
            if isinstance(spec, str):
                target = str(self.render_text(spec, item))
                images.append(self._image(target, None, "auto"))
            else:
                url = str(self.render_text(spec.url, item)) if spec.url else None
                path = str(self.render_text(spec.path, item)) if spec.path else None
                images.append(self._image(url, path, spec.detail))
        examples = [
            (ex.input, ex.output if isinstance(ex.output, str) else json.dumps(ex.output, ensure_ascii=False))
            for ex in cfg.examples
        ]
        user_text = self.render_text(cfg.input, item)
        return Prompt(build_messages(self.instructions(), examples, str(user_text), images), images)

    def _image(self, url: str | None, path: str | None, detail: str) -> Image:
        if url is not None and url.startswith(("http://", "https://", "data:")):
            return image_from_url(url, detail)
        return image_from_file(self.resolve_path(path or url or ""), detail)

    def params(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.config
        params: dict[str, Any] = {
            "model": cfg.model,
            "messages": messages,
            "max_tokens": cfg.max_output_tokens,
            "temperature": cfg.temperature,
        }
        schema = cfg.output.built
        if schema is not None:
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": schema.name, "schema": schema.sent, "strict": True},
            }
        if cfg.prompt_cache_key:
            params["prompt_cache_key"] = cfg.prompt_cache_key
        return params

    def count(self, prompt: Prompt, messages: list[dict[str, Any]]) -> int:
        """The prompt's tokens as billed: messages, images and the output schema."""
        schema = self.config.output.built
        return tokens.count_messages(messages, image_sizes=prompt.image_sizes, schema=schema.sent if schema else None)

    def rate_tokens(self, prompt: Prompt, messages: list[dict[str, Any]]) -> int:
        """What a request costs of the tokens-per-minute limit: its messages plus max_tokens.

        OpenAI estimates it from the request's text and max_tokens before the model runs;
        the output schema is not part of that estimate (it is billed, but not counted).
        """
        return tokens.count_messages(messages, image_sizes=prompt.image_sizes) + self.config.max_output_tokens

    def check_fits(self, prompt_tokens: int) -> None:
        room = self.window - self.config.max_output_tokens
        if prompt_tokens > room:
            raise QuarantineItem(
                f"prompt too long: {prompt_tokens:,} tokens, but {self.config.model}'s {self.window:,}-token context "
                f"minus max_output_tokens {self.config.max_output_tokens:,} leaves {room:,}; not sent"
            )

    # -- estimates (automator run --dry-run) -------------------------------------------

    def estimate_item(self, item: Item) -> dict[str, Any]:
        """What sending this item would take, without sending: tokens, the cost's upper bound, a cache hit.

        Raises QuarantineItem when the item would be quarantined (too long, missing image).
        """
        prompt = self.prompt(item)
        prompt_tokens = self.count(prompt, prompt.messages)
        self.check_fits(prompt_tokens)
        key = request_key(self.params(prompt.messages))
        cached = self.reads_cache and self.context.history.model_calls.cached_response(key, count_hit=False) is not None
        batch = self.config.mode == "batch"
        bound = self.calls.upper_bound(prompt_tokens, self.config.max_output_tokens, batch=batch)
        return {
            "input_tokens": prompt_tokens,
            "max_output_tokens": self.config.max_output_tokens,
            "cached": cached,
            "max_cost_usd": Decimal(0) if cached else bound,
        }

    # -- one item ---------------------------------------------------------------------

    # -- one item ---------------------------------------------------------------------

    async def transform(self, item: Item) -> Any:
        await self.client()
        prompt = self.prompt(item)
        prompt_tokens = self.count(prompt, prompt.messages)
        self.check_fits(prompt_tokens)
        key = request_key(self.params(prompt.messages))
        answer = await self.calls.once(
            key, item.seq, lambda: self.ask(item, prompt, prompt_tokens, key=key), cache=self.reads_cache
        )
        return self.result(item, answer["content"])

    async def ask(
        self,
        item: Item,
        prompt: Prompt,
        prompt_tokens: int,
        *,
        messages: list[dict[str, Any]] | None = None,
        first_repair: int = 0,
        attempt: int = 0,
        key: str | None = None,
    ) -> Answer:
        """Ask until an answer is accepted, re-asking with the problem fed back; quarantine after that.

        A batch answer that was rejected continues here at ``first_repair`` 1, its repair turns in ``messages``.
        ``key``: the request's cache key; the accepted answer is cached under it with its call.
        """
        messages = messages or prompt.messages
        problem = ""
        for repair in range(first_repair, self.config.max_repairs + 1):
            if repair:
                self.calls.stats["repairs"] += 1
                prompt_tokens = self.count(prompt, messages)
                self.check_fits(prompt_tokens)
            reply, attempt, call_id = await self._send(item, prompt, messages, prompt_tokens, attempt, key)
            problem, answer_text = self.judge(reply)
            if not problem:
                answer = self.calls.answer(reply, answer_text)
                await self.calls.record(
                    item.seq,
                    attempt,
                    call_id=call_id,
                    reply=reply,
                    status=CallStatus.OK,
                    prompt=prompt.messages,
                    response=reply.content,
                    request_key=key,
                    answer=answer,
                )
                return answer
            await self.calls.record(
                item.seq,
                attempt,
                call_id=call_id,
                reply=reply,
                status=CallStatus.REJECTED,
                error=problem,
                prompt=messages,
                response=reply.content,
            )
            messages = messages + repair_turns(
                reply.content or reply.refusal or "", problem, structured=self.structured
            )
        raise QuarantineItem(
            f"{self.config.model} gave no acceptable answer in {self.config.max_repairs + 1} tries; last: {problem}"
        )

    @property
    def structured(self) -> bool:
        return self.config.structured

    def judge(self, reply: Reply) -> tuple[str, str]:
        """What is wrong with an answer ('' when nothing), and its text."""
        if reply.refusal:
            return f"the model refused: {reply.refusal}", ""
        if reply.finish_reason == "content_filter":
            return "the answer was withheld by the content filter", ""
        if reply.finish_reason == "length":
            return (
                f"the answer was cut off at max_output_tokens ({self.config.max_output_tokens}); answer more briefly",
                "",
            )
        text = reply.content or ""
        schema = self.config.output.built
        if schema is None:
            return "", text
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"the answer is not valid JSON ({exc.msg} at character {exc.pos})", ""
        errors = schema.errors(value)
        if errors:
            return "the answer does not match the schema: " + "; ".join(errors), ""
        return "", text

    def result(self, item: Item, content: str | None) -> Any:
        cfg = self.config
        value: Any = json.loads(content or "") if cfg.structured else content
        into = cfg.output.into
        if into is None and cfg.structured:
            return value
        base = item.data if isinstance(item.data, dict) else {"value": item.data}
        return {**base, (into or "text"): value}

    # -- sending, under the step's retry policy ------------------------------------------

    async def _send(
        self,
        item: Item,
        prompt: Prompt,
        messages: list[dict[str, Any]],
        prompt_tokens: int,
        attempt: int,
        key: str | None = None,
    ) -> tuple[Reply, int, int]:
        """One request, tried as the step's ``retry:`` policy says: (reply, attempts so far, its call's row).

        Every attempt is a ``sent`` row before it leaves; a failed one gets its error here,
        an answered one its usage from the caller (with the verdict on the answer).

        The engine's ``Caller`` does the waiting (the policy's backoff, or the server's
        retry-after); once it gives up the error is final, so the engine does not try the
        item again on top of it.
        """
        cfg = self.config
        client = await self.client()
        params = self.params(messages)
        rate_tokens = self.rate_tokens(prompt, messages)
        tries = attempt
        call_id = 0

        async def once() -> Reply:
            nonlocal tries, call_id
            if self._fatal:
                raise ModelError(f"not sent: {self._fatal}", retryable=False)
            bound = self.calls.upper_bound(prompt_tokens, cfg.max_output_tokens)
            self.calls.reserve(bound)
            tries += 1
            try:
                ticket = await self.limiter.acquire(rate_tokens)
            except BaseException:
                self.calls.settle(bound, Decimal(0))
                raise
            headers: Mapping[str, str] = {}
            try:
                # write-ahead: the call is in the history before the request can be billed
                call_id = await self.calls.sent(item.seq, tries, bound=bound, request_key=key)
            except BaseException:
                self.calls.settle(bound, Decimal(0))
                self.limiter.done(ticket, headers)
                raise
            try:
                self.limiter.sending(ticket)
                reply = await complete(client, params)
                headers = reply.headers
            except CallFailed as failed:
                headers = failed.headers
                self.calls.settle(bound, Decimal(0))
                await self.calls.record(
                    item.seq,
                    tries,
                    call_id=call_id,
                    reply=None,
                    status=CallStatus.ERROR,
                    error=failed.message,
                    latency_ms=failed.latency_ms,
                    request_id=failed.request_id,
                )
                if failed.too_long:
                    raise QuarantineItem(f"prompt too long for {cfg.model}: {failed.message}") from None
                if not failed.retryable:
                    if failed.status in (401, 403):
                        self._fatal = failed.message  # every other item would be refused the same way
                    raise ModelError(failed.message, retryable=False) from None
                if failed.status == 429:
                    self.calls.stats["rate_limited"] += 1
                    # everyone waits, not only this item: the limit is the account's
                    self.limiter.pause(failed.retry_after if failed.retry_after is not None else 1.0)
                raise TransientModelError(failed.message, failed.retry_after) from None
            except BaseException:
                # cancelled (a timeout, an interrupted run) or broken while in flight: the
                # provider may have answered and billed, so the call stays at its bound
                self.calls.settle(bound, bound)
                await asyncio.shield(self.calls.lost(call_id, bound))
                raise
            finally:
                self.limiter.done(ticket, headers)
            self.calls.settle(bound, self.calls.cost_of(reply))
            self.calls.stats["calls"] += 1
            return reply

        caller = Caller(retry=self.retry, timeout=None, blocking=False)
        try:
            reply = await caller.call(once)
        except TransientModelError as last:
            raise ModelError(
                f"gave up after {tries - attempt} attempt(s) (retry: attempts {self.retry.attempts}); "
                f"last: {last.message}",
                retryable=False,
            ) from None
        finally:
            self.calls.stats["retries"] += caller.retries
        return reply, tries, call_id

    # -- the end ----------------------------------------------------------------------

    @property
    def stats(self) -> Any:
        return self.calls.stats

    def summary(self) -> str | None:
        s = self.calls.stats
        if not (s["calls"] or s["cached"]):
            return None
        parts = [f"{s['calls']} model call(s)", f"{s['cached']} from cache", f"cost {pricing.usd(self.calls.cost)}"]
        if s["retries"]:
            parts.append(f"{s['retries']} retried")
        if s["repairs"]:
            parts.append(f"{s['repairs']} re-asked")
        if s["batches"]:
            parts.insert(1, f"{s['batches']} batch(es) at Batch API prices")
        if s["adopted"]:
            parts.append(f"{s['adopted']} batch(es) created before a restart picked up, not sent again")
        if s["unconfirmed"]:
            parts.append(f"{s['unconfirmed']} sent without an answer recorded (counted at their upper bound)")
        if s["rate_limited"]:
            parts.append(f"{s['rate_limited']} rate-limited (429)")
        if self.limiter.waited_s > 0:
            parts.append(f"waited {self.limiter.waited_s:.1f} s for the rate limits")
        if not pricing.is_priced(self.config.model) and self.config.prices is None:
            parts.append(f"no prices known for {self.config.model}: cost counted as 0")
        return ", ".join(parts)

    async def close(self) -> None:
        try:
            await self.calls.close()
        finally:
            if self._client is not None:
                await self._client.close()


@hookimpl
def register_step_types(register: Any) -> None:
    register(OpenAITransform)


__all__ = ["OpenAITransform", "OpenAITransformConfig", "StepError"]
