"""openai.transform: each item through GPT-4o mini (or any OpenAI-compatible model).

Static instructions first and the item last (prompt caching); structured output checked
on return and re-asked with the problem fed back; 429/5xx/timeouts retried honouring
retry-after; requests and tokens per minute paced; every attempt recorded with its exact
cost; identical requests answered from the response cache; budgets enforced before
sending. Every path ends in an outcome: a result, a quarantine with the reason, or a
failure with the error — never a lost item. ``mode: batch`` lives in openai_batch.
"""

from __future__ import annotations

import asyncio
import json
import random
from datetime import timedelta
from decimal import Decimal
from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from automator import Duration, Item, ModelError, QuarantineItem, StepConfig, StepError, TransformStep, hookimpl
from automator.llm import budget as budgets
from automator.llm import pricing, records, tokens
from automator.llm.limiter import RateLimiter
from automator.llm.schema import OutputSchema, SchemaProblem, build
from automator_standard.openai_batch import BatchTransform
from automator_standard.openai_client import CallFailed, Reply, complete, make_client
from automator_standard.openai_prompt import (
    Image,
    Prompt,
    build_messages,
    image_from_file,
    image_from_url,
    repair_turns,
    request_key,
)

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 20.0
RETRY_AFTER_MAX_S = 120.0


class ImageConfig(StepConfig):
    url: str | None = Field(None, description="An http(s) or data: URL; templates allowed.")
    path: str | None = Field(None, description="A local image file (sent as a data URL); templates allowed.")
    detail: Literal["low", "high", "auto"] = Field(
        "auto", description="low: 2,833 tokens; high/auto: 2,833 + 5,667 per 512 px tile."
    )

    @model_validator(mode="after")
    def _one(self) -> ImageConfig:
        if (self.url is None) == (self.path is None):
            raise ValueError("give exactly one of url or path")
        return self


class ExampleConfig(StepConfig):
    input: str = Field(description="What the user says in the example (no templates).")
    output: Any = Field(description="The answer: an object (structured output) or text.")


class OutputConfig(StepConfig):
    schema_: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="A compact field map (name: type, enum list or JSON Schema) or a full JSON Schema object.",
    )
    name: str = Field("result", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The schema's name sent to the API.")
    into: str | None = Field(
        None,
        description="Keep the item and put the answer under this key; default: the answer becomes the item "
        "(text answers go under `text`).",
    )
    _built: OutputSchema | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _build(self) -> OutputConfig:
        if self.schema_ is not None:
            try:
                self._built = build(self.schema_, self.name)
            except SchemaProblem as exc:
                raise ValueError(f"output.schema: {exc}") from None
        return self

    @property
    def built(self) -> OutputSchema | None:
        return self._built


class PricesConfig(StepConfig):
    input: Decimal = Field(ge=0, description="USD per 1M input tokens.")
    cached_input: Decimal = Field(ge=0, description="USD per 1M cached input tokens.")
    output: Decimal = Field(ge=0, description="USD per 1M output tokens.")


class OpenAITransformConfig(StepConfig):
    model: str = Field("gpt-4o-mini", description="The model id.")
    instructions: str = Field(
        description="The system message: the same for every item (templates may use params, not item)."
    )
    input: str = Field("{{ item | tojson }}", description="The item's part of the prompt (a template); sent last.")
    images: list[str | ImageConfig] = Field(
        default_factory=list, description="Images for each item: URLs, data URLs or local files; templates allowed."
    )
    examples: list[ExampleConfig] = Field(default_factory=list, description="Few-shot examples, after instructions.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Text, or structured JSON by a schema.")
    max_output_tokens: int = Field(
        1024, ge=1, le=16_384, description="The answer's limit (gpt-4o-mini: at most 16,384)."
    )
    temperature: float = Field(0.0, ge=0, le=2)
    mode: Literal["sync", "batch"] = Field(
        "sync", description="sync: a call per item; batch: all items through the Batch API at half price."
    )
    cache: bool | None = Field(
        None, description="Answer identical requests from the response cache (default: on at temperature 0)."
    )
    rpm: int | None = Field(None, ge=1, description="Requests per minute to stay under (also learned from headers).")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute to stay under (also learned from headers).")
    max_retries: int = Field(6, ge=0, le=50, description="Retries of 429s, 5xx and timeouts, per item.")
    max_repairs: int = Field(
        2, ge=0, le=10, description="Re-asks when an answer is cut off, refused or breaks the schema."
    )
    request_timeout: Duration = Field(timedelta(seconds=60), description="Per request.")
    store_prompts: bool = Field(
        False, description="Keep prompts and validated answers in the history (for `automator export finetune`)."
    )
    base_url: str | None = Field(None, description="An OpenAI-compatible server; default $OPENAI_BASE_URL.")
    api_key: str | None = Field(None, description="Default $OPENAI_API_KEY; write '{{ secrets.NAME }}'.")
    prices: PricesConfig | None = Field(None, description="Prices of a model the seed table does not know.")
    context_window: int | None = Field(None, ge=1, description="Of a model the seed table does not know.")
    prompt_cache_key: str | None = Field(None, description="Groups requests for OpenAI's prompt cache.")
    batch_poll_interval: Duration = Field(timedelta(seconds=30), description="mode: batch: how often to poll.")
    batch_max_requests: int = Field(
        50_000, ge=1, le=50_000, description="mode: batch: requests per batch (also split at 200 MB per input file)."
    )

    @model_validator(mode="after")
    def _fits_model(self) -> OpenAITransformConfig:
        window = self.context_window or pricing.facts(self.model).context_window
        if self.max_output_tokens >= window:
            raise ValueError(f"max_output_tokens {self.max_output_tokens} leaves no room in a {window}-token context")
        return self

    @property
    def structured(self) -> bool:
        return self.output.built is not None


class OpenAITransform(TransformStep[OpenAITransformConfig]):
    name = "openai.transform"
    description = "Transform each item with GPT-4o mini: structured output, retries, exact cost, cache, budgets."
    default_concurrency = 16

    def __init__(self, config: OpenAITransformConfig, context: Any, step_id: str) -> None:
        super().__init__(config, context, step_id)
        self._client: Any = None
        self._setup_lock = asyncio.Lock()
        self.recorder = records.CallRecorder(context.history)
        self.limiter = RateLimiter(rpm=config.rpm, tpm=config.tpm)
        self.prices = pricing.facts(
            config.model,
            pricing.ModelFacts(**config.prices.model_dump()) if config.prices else None,
        )
        self.window = config.context_window or self.prices.context_window
        self.budget: budgets.Budget | None = None
        self._instructions: str | None = None
        self._inflight: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        self._fatal: str | None = None
        self.stats = {"calls": 0, "cached": 0, "retries": 0, "repairs": 0, "rate_limited": 0, "batches": 0}
        # mode: batch: batches a process created before it died, found on OpenAI and not sent again
        self.stats["adopted"] = 0
        self.cost = Decimal(0)

    @property
    def transform_batch(self) -> Any:
        """mode: batch: the runner hands over all items at once (see openai_batch)."""
        return BatchTransform(self).run if self.config.mode == "batch" else None

    # -- set-up -----------------------------------------------------------------------

    @property
    def reads_cache(self) -> bool:
        if self.config.cache is not None:
            return self.config.cache
        # a resumed run must not pay again for answers its crashed predecessor recorded
        return self.config.temperature == 0 or self.context.info.resumed or self.context.info.trigger == "resume"

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
                    self.budget = budgets.for_run(self.context)
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
        schema = self.config.output.built
        return tokens.count_messages(messages, image_sizes=prompt.image_sizes, schema=schema.sent if schema else None)

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
        cached = self.reads_cache and records.cached_response(self.context.history, key, count_hit=False) is not None
        batch = self.config.mode == "batch"
        bound = pricing.upper_bound(
            self.prices, input_tokens=prompt_tokens, max_output_tokens=self.config.max_output_tokens, batch=batch
        )
        return {
            "input_tokens": prompt_tokens,
            "max_output_tokens": self.config.max_output_tokens,
            "cached": cached,
            "max_cost_usd": Decimal(0) if cached else bound,
        }

    # -- one item ---------------------------------------------------------------------

    async def transform(self, item: Item) -> Any:
        await self.client()
        prompt = self.prompt(item)
        prompt_tokens = self.count(prompt, prompt.messages)
        self.check_fits(prompt_tokens)
        key = request_key(self.params(prompt.messages))
        answer = await self._cached(item, key)
        if answer is None:
            answer = await self._answer_once(item, key, prompt, prompt_tokens)
        return self.result(item, answer["content"])

    async def _cached(self, item: Item, key: str, *, force: bool = False) -> dict[str, Any] | None:
        if not (self.reads_cache or force):
            return None
        waiting = self._inflight.get(key)
        found = await asyncio.shield(waiting) if waiting is not None else None
        if found is None:
            found = self.recorder.pending_cache(key) or await asyncio.to_thread(
                records.cached_response, self.context.history, key
            )
        if found is not None:
            self.stats["cached"] += 1
            self._record(item, 0, reply=None, status="cached", mode="cache", request_id=found.get("request_id"))
        return found

    async def _answer_once(self, item: Item, key: str, prompt: Prompt, prompt_tokens: int) -> dict[str, Any]:
        """Ask the model (and let identical items of this run wait for this answer)."""
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        if self.reads_cache:
            self._inflight[key] = future
        answer: dict[str, Any] | None = None
        try:
            answer = await self._ask(item, prompt, prompt_tokens)
            self.recorder.cache(
                key, model=self.config.model, workflow=self.context.workflow.name, step_id=self.step_id, response=answer
            )
            return answer
        finally:
            future.set_result(answer)
            self._inflight.pop(key, None)

    async def _ask(
        self,
        item: Item,
        prompt: Prompt,
        prompt_tokens: int,
        *,
        messages: list[dict[str, Any]] | None = None,
        first_repair: int = 0,
        attempt: int = 0,
    ) -> dict[str, Any]:
        """Ask until an answer is accepted, re-asking with the problem fed back; quarantine after that.

        A batch answer that was rejected continues here at ``first_repair`` 1, its repair turns in ``messages``.
        """
        messages = messages or prompt.messages
        problem = ""
        for repair in range(first_repair, self.config.max_repairs + 1):
            if repair:
                self.stats["repairs"] += 1
                prompt_tokens = self.count(prompt, messages)
                self.check_fits(prompt_tokens)
            reply, attempt = await self._send(item, self.params(messages), prompt_tokens, attempt)
            problem, answer_text = self.judge(reply)
            if not problem:
                self._record(item, attempt, reply=reply, status="ok", prompt=prompt.messages, response=reply.content)
                return {
                    "content": answer_text,
                    "finish_reason": reply.finish_reason,
                    "request_id": reply.request_id,
                    "usage": {
                        "input_tokens": reply.input_tokens,
                        "cached_input_tokens": reply.cached_input_tokens,
                        "output_tokens": reply.output_tokens,
                    },
                }
            self._record(
                item, attempt, reply=reply, status="rejected", error=problem, prompt=messages, response=reply.content
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

    def result(self, item: Item, content: str) -> Any:
        cfg = self.config
        value: Any = json.loads(content) if cfg.structured else content
        into = cfg.output.into
        if into is None and cfg.structured:
            return value
        base = item.data if isinstance(item.data, dict) else {"value": item.data}
        return {**base, (into or "text"): value}

    # -- sending, with retries --------------------------------------------------------

    async def _send(self, item: Item, params: dict[str, Any], prompt_tokens: int, attempt: int) -> tuple[Reply, int]:
        cfg = self.config
        assert self.budget is not None
        client = await self.client()
        last = ""
        for retry in range(cfg.max_retries + 1):
            if self._fatal:
                raise ModelError(f"not sent: {self._fatal}", retryable=False)
            bound = pricing.upper_bound(
                self.prices, input_tokens=prompt_tokens, max_output_tokens=cfg.max_output_tokens
            )
            self.budget.reserve(bound)
            attempt += 1
            if retry:
                self.stats["retries"] += 1
            await self.limiter.acquire(prompt_tokens + cfg.max_output_tokens)
            try:
                reply = await complete(client, params)
            except CallFailed as failed:
                self.budget.settle(bound, Decimal(0))
                self.limiter.observe(failed.headers)
                self._record(item, attempt, reply=None, status="error", error=failed.message, failed=failed)
                last = failed.message
                if failed.too_long:
                    raise QuarantineItem(f"prompt too long for {cfg.model}: {failed.message}") from None
                if not failed.retryable:
                    if failed.status in (401, 403):
                        self._fatal = failed.message  # every other item would be refused the same way
                    raise ModelError(failed.message, retryable=False) from None
                wait = self._backoff(retry, failed)
                if failed.status == 429:
                    self.stats["rate_limited"] += 1
                    self.limiter.pause(wait)
                if retry < cfg.max_retries:
                    await asyncio.sleep(wait)
                continue
            self.limiter.observe(reply.headers)
            cost = self.call_cost(reply)
            self.budget.settle(bound, cost)
            self.stats["calls"] += 1
            return reply, attempt
        raise ModelError(f"gave up after {cfg.max_retries + 1} attempts; last: {last}", retryable=False)

    @staticmethod
    def _backoff(retry: int, failed: CallFailed) -> float:
        if failed.retry_after is not None:
            return min(failed.retry_after, RETRY_AFTER_MAX_S)
        ceiling = min(BACKOFF_BASE_S * 2**retry, BACKOFF_MAX_S)
        return ceiling * random.uniform(0.5, 1.0)

    def call_cost(self, reply: Reply, *, batch: bool = False) -> Decimal:
        return pricing.cost(
            self.prices,
            input_tokens=reply.input_tokens,
            cached_input_tokens=reply.cached_input_tokens,
            output_tokens=reply.output_tokens,
            batch=batch,
        )

    # -- the history ------------------------------------------------------------------

    def _record(
        self,
        item: Item,
        attempt: int,
        *,
        reply: Reply | None,
        status: str,
        mode: str | None = None,
        error: str | None = None,
        failed: CallFailed | None = None,
        prompt: Any = None,
        response: Any = None,
        request_id: str | None = None,
        batch: bool = False,
    ) -> None:
        redact = self.context.redactor
        cost = self.call_cost(reply, batch=batch) if reply is not None and status != "cached" else Decimal(0)
        self.cost += cost
        keep = self.config.store_prompts
        self.recorder.call(
            run_id=self.context.run_id,
            workflow=self.context.workflow.name,
            step_id=self.step_id,
            item_seq=item.seq,
            attempt=attempt,
            model=(reply.model if reply and reply.model else self.config.model)[:100],
            mode=mode or ("batch" if batch else "sync"),
            status=status,
            input_tokens=reply.input_tokens if reply else 0,
            cached_input_tokens=reply.cached_input_tokens if reply else 0,
            output_tokens=reply.output_tokens if reply else 0,
            cost_usd=cost,
            latency_ms=reply.latency_ms if reply else (failed.latency_ms if failed else None),
            request_id=(reply.request_id if reply else (failed.request_id if failed else request_id)),
            error=redact.text(error),
            prompt=redact.data(prompt) if keep else None,
            response=redact.data(response) if keep else None,
        )

    # -- the end ----------------------------------------------------------------------

    def summary(self) -> str | None:
        s = self.stats
        if not (s["calls"] or s["cached"]):
            return None
        parts = [f"{s['calls']} model call(s)", f"{s['cached']} from cache", f"cost {pricing.usd(self.cost)}"]
        if s["retries"]:
            parts.append(f"{s['retries']} retried")
        if s["repairs"]:
            parts.append(f"{s['repairs']} re-asked")
        if s["batches"]:
            parts.insert(1, f"{s['batches']} batch(es) at Batch API prices")
        if s["adopted"]:
            parts.append(f"{s['adopted']} batch(es) created before a restart picked up, not sent again")
        if s["rate_limited"]:
            parts.append(f"{s['rate_limited']} rate-limited (429)")
        if not pricing.is_priced(self.config.model) and self.config.prices is None:
            parts.append(f"no prices known for {self.config.model}: cost counted as 0")
        return ", ".join(parts)

    async def close(self) -> None:
        try:
            await self.recorder.close()
        finally:
            if self._client is not None:
                await self._client.close()


@hookimpl
def register_step_types(register: Any) -> None:
    register(OpenAITransform)


__all__ = ["OpenAITransform", "OpenAITransformConfig", "StepError"]
