"""``automator costs``: what the model calls cost, per workflow, day or step.

``cost`` is what the answered calls cost, exactly. ``+ unconfirmed ≤`` is the most the calls
without a recorded answer can have cost: those in flight now, and those whose answer a
crash lost (``unconfirmed``, each at its upper bound). What the provider billed is never
more than the two together.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import click
from rich.table import Table

from automator.cli.common import echo_json, settings, stdout
from automator.errors import ConfigError
from automator.history.model_calls import COST_GROUPS
from automator.history.protocols import ModelCallStore
from automator.llm import records
from automator.llm.pricing import COST_QUANTUM, usd
from automator.spec.durations import parse_duration

GROUPS = COST_GROUPS


def _since(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"--since {text!r}: {exc}") from None


def _exact(amount: Any) -> str:
    """Dollars to the nano-dollar as a plain decimal string ("0.000000000", never "0E-9")."""
    return format(Decimal(str(amount)).quantize(COST_QUANTUM), "f")


def cost_rows(store: ModelCallStore, since: timedelta, by: str) -> list[dict[str, Any]]:
    """Spend since ``now - since``, grouped; cache hits are counted but cost nothing.

    ``cost_usd``: the answered calls; ``unconfirmed_usd``: the upper bound of the calls sent
    without an answer recorded (``unconfirmed_calls`` of them, in flight or lost in a crash)."""
    width = 2 if by == "step" else 1  # the group's columns, then the sums
    rows = []
    for row in store.cost_rows(records.since(since), by):
        group = list(row[:width])
        calls, hits, inp, cached, out, cost, bound, unconfirmed = row[width:]
        entry: dict[str, Any] = {}
        if by == "step":
            entry["workflow"], entry["step"] = group
        else:
            entry[by] = group[0]
        entry.update(
            calls=int(calls or 0),
            cache_hits=int(hits or 0),
            input_tokens=int(inp),
            cached_input_tokens=int(cached),
            output_tokens=int(out),
            cost_usd=_exact(cost),
            unconfirmed_calls=int(unconfirmed or 0),
            unconfirmed_usd=_exact(bound),
        )
        rows.append(entry)
    return rows


@click.command()
@click.option("--since", "since_text", default="7d", show_default=True, help="How far back: 24h, 7d, 30d, ...")
@click.option("--by", type=click.Choice(GROUPS), default="workflow", show_default=True, help="Group the spend by.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a JSON list; cost_usd and unconfirmed_usd (an upper bound) are exact decimal strings.",
)
@click.pass_context
def costs(ctx: click.Context, since_text: str, by: str, as_json: bool) -> None:
    """What model calls cost (tokens in, cached, out; USD), per workflow, day or step.

    "+ unconfirmed ≤" is the most that calls sent without a recorded answer (in flight, or
    lost in a crash) can have cost: the provider billed at most cost plus that.
    """
    since = _since(since_text)
    rows = cost_rows(settings(ctx).history().model_calls, since, by)
    if as_json:
        echo_json(rows)
        return
    table = Table(title=f"Model spend, last {since_text}", title_justify="left")
    columns = ["workflow", "step"] if by == "step" else [by]
    for name in (*columns, "calls", "cache hits", "input", "cached", "output", "cost", "+ unconfirmed ≤"):
        table.add_column(name, justify="right" if name not in columns else "left")
    total = bound = Decimal(0)
    for row in rows:
        total += Decimal(row["cost_usd"])
        bound += Decimal(row["unconfirmed_usd"])
        table.add_row(
            *(str(row[c]) for c in columns),
            f"{row['calls']:,}",
            f"{row['cache_hits']:,}",
            f"{row['input_tokens']:,}",
            f"{row['cached_input_tokens']:,}",
            f"{row['output_tokens']:,}",
            usd(Decimal(row["cost_usd"])),
            f"{usd(Decimal(row['unconfirmed_usd']))} ({row['unconfirmed_calls']:,})"
            if row["unconfirmed_calls"]
            else "",
        )
    if not rows:
        stdout.print(f"no model calls in the last {since_text}", markup=False)
        return
    stdout.print(table)
    if bound:
        stdout.print(
            f"total: {usd(total)} + at most {usd(bound)} unconfirmed (sent, answer not recorded)", markup=False
        )
    else:
        stdout.print(f"total: {usd(total)}", markup=False)
