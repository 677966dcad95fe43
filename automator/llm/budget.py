"""Budgets: a run stops sending to the model before it would pass max_cost_usd (per run, per day).

Each call reserves its upper bound (no cache hit, every output token used) before it is
sent and settles at its real cost afterwards, so concurrent calls cannot overshoot
together. The day's spend of earlier runs is read once when the run's first model step
starts; runs of the same workflow racing each other may pass the daily limit by at most
what they had in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from automator.errors import StepError
from automator.llm import records
from automator.llm.pricing import usd

if TYPE_CHECKING:
    from automator.engine.context import RunContext

CONTEXT_KEY = "llm_budget"


class BudgetExceeded(StepError):  # noqa: N818 - reads as what happened
    """Sending this call would pass a budget; the item fails with the reason, never sent."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@dataclass
class Budget:
    per_run: Decimal | None
    per_day: Decimal | None
    spent_today_before: Decimal = Decimal(0)
    spent: Decimal = Decimal(0)
    reserved: Decimal = Decimal(0)

    def reserve(self, amount: Decimal) -> None:
        committed = self.spent + self.reserved
        if self.per_run is not None and committed + amount > self.per_run:
            raise BudgetExceeded(
                f"budget: max_cost_usd {usd(self.per_run)} per run would be passed "
                f"(spent {usd(self.spent)}, in flight {usd(self.reserved)}, this call up to {usd(amount)}); not sent"
            )
        if self.per_day is not None and self.spent_today_before + committed + amount > self.per_day:
            raise BudgetExceeded(
                f"budget: max_cost_usd_per_day {usd(self.per_day)} would be passed "
                f"(spent today {usd(self.spent_today_before + self.spent)}, this call up to {usd(amount)}); not sent"
            )
        self.reserved += amount

    def settle(self, reserved: Decimal, actual: Decimal) -> None:
        self.reserved -= reserved
        self.spent += actual


def for_run(context: RunContext) -> Budget:
    """The run's one budget, shared by all its model steps."""
    budget = context.extra.get(CONTEXT_KEY)
    if isinstance(budget, Budget):
        return budget
    spec = context.workflow.spec.budget
    per_run = spec.max_cost_usd if spec else None
    per_day = spec.max_cost_usd_per_day if spec else None
    before = Decimal(0)
    if per_day is not None:
        before = context.history.model_calls.spent_since(context.workflow.name, records.start_of_day())
    budget = Budget(per_run=per_run, per_day=per_day, spent_today_before=before)
    context.extra[CONTEXT_KEY] = budget
    return budget
