"""``automator run FILE --dry-run``: what a run would send to the model, and the most it could cost.

The fetch steps run (they only read), items already delivered are left out as a real
run would, and the transform and validate steps that are not model steps run too, so
that filtered items are not counted. Model steps are never called: each item's prompt
is rendered and counted exactly (o200k_base), and its cost bounded from above (no
prompt-cache discount, every output token used); answers already in the response cache
cost nothing. Deliver steps never run. After a model step, later steps see the item
as it was before it (the model's answer is unknown).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

from automator.engine.context import RunContext
from automator.errors import ItemSignal, StepError
from automator.history.store import History
from automator.plugins.events import RunInfo
from automator.plugins.manager import Plugins
from automator.plugins.steps import PHASE_METHOD, FetchStep, Item, Phase
from automator.spec.loader import Workflow


@dataclass
class StepEstimate:
    step_id: str
    model: str
    items: int = 0
    cache_hits: int = 0
    input_tokens: int = 0
    max_output_tokens: int = 0
    max_cost_usd: Decimal = Decimal(0)
    not_sent: dict[str, int] = field(default_factory=dict)  # reason -> items

    def as_json(self) -> dict[str, Any]:
        return {
            "step": self.step_id,
            "model": self.model,
            "items": self.items,
            "cache_hits": self.cache_hits,
            "input_tokens": self.input_tokens,
            "max_output_tokens": self.max_output_tokens,
            "max_cost_usd": str(self.max_cost_usd),
            "not_sent": self.not_sent,
        }


@dataclass
class Estimate:
    workflow: str
    fetched: int
    already_delivered: int
    steps: list[StepEstimate]

    @property
    def max_cost_usd(self) -> Decimal:
        return sum((s.max_cost_usd for s in self.steps), Decimal(0))

    def as_json(self) -> dict[str, Any]:
        return {
            "workflow": self.workflow,
            "dry_run": True,
            "fetched": self.fetched,
            "already_delivered": self.already_delivered,
            "max_cost_usd": str(self.max_cost_usd),
            "steps": [s.as_json() for s in self.steps],
        }


async def _call(method: Any, *args: Any) -> Any:
    result = method(*args)
    return await result if inspect.isawaitable(result) else result


def _short(reason: str) -> str:
    return reason.split(":")[0][:80]


async def estimate(
    workflow: Workflow, history: History, plugins: Plugins, params: dict[str, Any] | None = None
) -> Estimate:
    """Run the workflow's fetch, transform and validate steps dry; count what the model steps would send."""
    from automator.engine.runner import resolve_params

    info = RunInfo(0, workflow.name, "dry-run", datetime.now(UTC), workflow.version)
    ctx = RunContext(workflow, plugins, history, info, resolve_params(workflow, params))
    items: list[Item] = []
    already = 0
    for bound in workflow.steps:
        step = bound.type(bound.config, ctx, bound.id)
        if bound.phase is Phase.FETCH:
            try:
                fetched = list(await _call(cast(FetchStep[Any], step).fetch) or [])
            finally:
                await step.close()
            batch: list[Item] = []
            for data in fetched:
                data = data if isinstance(data, dict) else {"value": data}
                item = Item(seq=len(items) + len(batch), data=data, steps={bound.id: data})
                if bound.spec.key is not None:
                    item.key = ctx.render_text(bound.spec.key, item)
                batch.append(item)
            delivered = history.delivered_keys(workflow.name, [i.key for i in batch if i.key]) if bound.only_new else {}
            already += sum(1 for i in batch if i.key in delivered)
            items.extend(i for i in batch if i.key not in delivered)
    estimates: list[StepEstimate] = []
    fetched_count = len(items) + already
    for bound in workflow.steps:
        if bound.phase in (Phase.FETCH, Phase.DELIVER):
            continue
        step = bound.type(bound.config, ctx, bound.id)
        try:
            if hasattr(step, "estimate_item"):
                estimates.append(_model_step(bound.id, step, items))
                continue
            kept = []
            method = getattr(step, PHASE_METHOD[bound.phase])
            for item in items:
                try:
                    result = await _call(method, item)
                except (ItemSignal, StepError):
                    continue
                if bound.phase is Phase.TRANSFORM:
                    if result is None:
                        continue
                    item.data = result if isinstance(result, dict) else {"value": result}
                item.steps = {**item.steps, bound.id: item.data}
                kept.append(item)
            items = kept
        finally:
            await step.close()
    return Estimate(workflow.name, fetched_count, already, estimates)


def _model_step(step_id: str, step: Any, items: list[Item]) -> StepEstimate:
    found = StepEstimate(step_id, str(getattr(step.config, "model", "?")))
    for item in items:
        try:
            numbers = step.estimate_item(item)
        except (ItemSignal, StepError) as exc:
            # secrets out before the cut: part of a secret would not be recognised
            text = getattr(exc, "reason", None) or getattr(exc, "message", str(exc))
            reason = _short(step.context.redactor.text(text) or "")
            found.not_sent[reason] = found.not_sent.get(reason, 0) + 1
            continue
        found.items += 1
        found.cache_hits += int(numbers["cached"])
        if not numbers["cached"]:
            found.input_tokens += numbers["input_tokens"]
            found.max_output_tokens += numbers["max_output_tokens"]
        found.max_cost_usd += numbers["max_cost_usd"]
    return found


def print_estimate(found: Estimate) -> None:
    from rich.table import Table

    from automator.cli.common import stdout
    from automator.llm.pricing import usd

    stdout.print(
        f"dry run of {found.workflow}: {found.fetched} item(s) fetched, "
        f"{found.already_delivered} already delivered; nothing was sent to a model",
        markup=False,
    )
    if not found.steps:
        stdout.print("no model steps", markup=False)
        return
    table = Table()
    for name in ("step", "model", "items", "cache hits", "input tokens", "max output tokens", "at most"):
        table.add_column(name, justify="left" if name in ("step", "model") else "right")
    for step in found.steps:
        table.add_row(
            step.step_id,
            step.model,
            f"{step.items:,}",
            f"{step.cache_hits:,}",
            f"{step.input_tokens:,}",
            f"{step.max_output_tokens:,}",
            usd(step.max_cost_usd),
        )
    stdout.print(table)
    for step in found.steps:
        for reason, count in step.not_sent.items():
            stdout.print(f"{step.step_id}: {count} item(s) would not be sent: {reason}", markup=False)
    stdout.print(f"upper bound of the cost: {usd(found.max_cost_usd)}", markup=False)


def dry_run(
    workflow: Workflow, history: History, plugins: Plugins, params: dict[str, Any] | None, *, as_json: bool
) -> Estimate:
    """What the CLI's --dry-run does: estimate, then print (as JSON or a table)."""
    import asyncio

    from automator.cli.common import echo_json

    found = asyncio.run(estimate(workflow, history, plugins, params))
    if as_json:
        echo_json(found.as_json())
    else:
        print_estimate(found)
    return found
