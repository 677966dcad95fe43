"""The settings of ``openai.transform`` (checked when the workflow file is loaded)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from automator import Duration, StepConfig
from automator.llm import pricing
from automator.llm.schema import OutputSchema, SchemaProblem, build


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
    max_retries: int | None = Field(
        None,
        description="Replaced by the step's `retry:` policy (attempts, backoff, max_backoff), which the model "
        "step follows like every step; giving it is an error.",
        json_schema_extra={"deprecated": True},
    )
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

    @field_validator("max_retries")
    @classmethod
    def _one_retry_policy(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError(
                "max_retries is gone: the model step follows the step's retry policy, "
                f"write `retry: {{attempts: {value + 1}}}` on the step (attempts count the first request)"
            )
        return value

    @model_validator(mode="after")
    def _fits_model(self) -> OpenAITransformConfig:
        window = self.context_window or pricing.facts(self.model).context_window
        if self.max_output_tokens >= window:
            raise ValueError(f"max_output_tokens {self.max_output_tokens} leaves no room in a {window}-token context")
        return self

    @property
    def structured(self) -> bool:
        return self.output.built is not None
