"""What a model call costs, exactly: Decimal prices per 1M tokens, never floats."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

PER_TOKEN = Decimal(1_000_000)
# the history keeps nine decimals (a nano-dollar): every seed price divides into it exactly
COST_QUANTUM = Decimal("0.000000001")


@dataclass(frozen=True)
class ModelFacts:
    """Prices (USD per 1M tokens) and limits of one model."""

    input: Decimal
    cached_input: Decimal
    output: Decimal
    context_window: int = 128_000
    max_output_tokens: int = 16_384
    batch_discount: Decimal = Decimal("0.5")  # the Batch API bills half


# The seed's prices. A model not listed costs what its step's `prices:` says (else 0, reported).
MODELS: dict[str, ModelFacts] = {
    "gpt-4o-mini": ModelFacts(input=Decimal("0.15"), cached_input=Decimal("0.075"), output=Decimal("0.60")),
}
MODEL_ALIASES = {"gpt-4o-mini-2024-07-18": "gpt-4o-mini"}
UNKNOWN = ModelFacts(input=Decimal(0), cached_input=Decimal(0), output=Decimal(0))


def facts(model: str, override: ModelFacts | None = None) -> ModelFacts:
    if override is not None:
        return override
    return MODELS.get(MODEL_ALIASES.get(model, model), UNKNOWN)


def is_priced(model: str) -> bool:
    return MODEL_ALIASES.get(model, model) in MODELS


def cost(
    prices: ModelFacts, *, input_tokens: int, cached_input_tokens: int = 0, output_tokens: int = 0, batch: bool = False
) -> Decimal:
    """The cost of one call; ``input_tokens`` is the API's prompt_tokens, cached ones included."""
    cached = min(cached_input_tokens, input_tokens)
    amount = (
        (input_tokens - cached) * prices.input + cached * prices.cached_input + output_tokens * prices.output
    ) / PER_TOKEN
    if batch:
        amount *= prices.batch_discount
    return amount.quantize(COST_QUANTUM, rounding=ROUND_HALF_EVEN)


def upper_bound(prices: ModelFacts, *, input_tokens: int, max_output_tokens: int, batch: bool = False) -> Decimal:
    """The most a call can cost: no cache hit, every output token used."""
    return cost(prices, input_tokens=input_tokens, output_tokens=max_output_tokens, batch=batch)


def usd(amount: Decimal) -> str:
    """Dollars for people: cents for large sums, micro-dollars for small ones."""
    if amount >= 1:
        return f"${amount:,.2f}"
    return f"${amount:.6f}"
