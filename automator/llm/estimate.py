"""``automator run FILE --dry-run``: what a run would send to the model, and the most it could cost.

The workflow goes through the engine's own pipeline and drivers with a recorder that
writes nothing (:mod:`automator.engine.dry_run`): the fetch steps run (they only read),
items whose key a run delivered are left out as a run would leave them out, and the
transform and validate steps that are not model steps run too, so that filtered and
invalid items are not counted. Model steps are never called: each item's prompt is
rendered and counted exactly (o200k_base), and its cost bounded from above (no
prompt-cache discount, every output token used); answers already in the response cache
cost nothing. Deliver steps never run, and no run is recorded. After a model step, later
steps see the item as it was before it (the model's answer is unknown).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from automator.engine.dry_run import StepEstimate, run_dry
from automator.errors import StepError
from automator.history.store import History
from automator.plugins.manager import Plugins
from automator.spec.loader import Workflow


@dataclass
class Estimate:
    workflow: str
    fetched: int
    already_delivered: int
    steps: list[StepEstimate]
    # what the items would become, and what each deliver step would deliver (not printed)
    outcomes: dict[str, int] = field(default_factory=dict)
    deliveries: dict[str, int] = field(default_factory=dict)
    digests: dict[str, int] = field(default_factory=dict)  # deliver step with group: -> groups

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
            "outcomes": self.outcomes,
            "deliveries": [
                {"step": step, "items": n, **({"digests": self.digests[step]} if step in self.digests else {})}
                for step, n in self.deliveries.items()
            ],
        }


async def estimate(
    workflow: Workflow, history: History, plugins: Plugins, params: dict[str, Any] | None = None
) -> Estimate:
    """Run the workflow dry; count what the model steps would send.

    Raises StepError when the run would stop (a fetch fails, or an item fails with
    ``on_item_error: stop``): its error, as the run would record it.
    """
    from automator.engine.runner import resolve_params

    found = await run_dry(workflow, history, plugins, resolve_params(workflow, params))
    if found.stop is not None:
        raise StepError(found.stop.error, retryable=False)
    counts = found.counts
    return Estimate(
        workflow.name,
        counts["fetched"],
        found.already_delivered,
        found.model_steps,
        outcomes={k: v for k, v in counts.items() if k != "fetched"},
        deliveries=found.deliveries,
        digests=found.digests,
    )


def print_estimate(found: Estimate) -> None:
    from rich.table import Table

    from automator.cli.common import stdout
    from automator.llm.pricing import usd

    stdout.print(
        f"dry run of {found.workflow}: {found.fetched} item(s) fetched, "
        f"{found.already_delivered} already delivered; nothing was sent to a model",
        markup=False,
    )
    for deliver_step, count in found.deliveries.items():
        groups = found.digests.get(deliver_step)
        into = f" in {groups} digest(s)" if groups is not None else ""
        stdout.print(f"{deliver_step}: would deliver {count} item(s){into}", markup=False)
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


__all__ = ["Estimate", "StepEstimate", "dry_run", "estimate", "print_estimate"]
