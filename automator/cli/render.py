"""How runs, plugins and results look on a terminal and as JSON (the JSON shapes are API)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich import progress as rich_progress
from rich.table import Table

from automator.cli.common import stdout
from automator.history.models import LedgerItem, Run, StepAttempt
from automator.history.states import Outcome, RunStatus
from automator.history.store import OUTCOMES

if TYPE_CHECKING:
    from automator.engine.runner import RunResult
    from automator.plugins.manager import PluginInfo

STATUS_STYLE: dict[str, str] = {
    RunStatus.SUCCEEDED: "green",
    RunStatus.FAILED: "red",
    RunStatus.TIMED_OUT: "red",
    RunStatus.CRASHED: "red",
    RunStatus.INTERRUPTED: "yellow",
    RunStatus.RUNNING: "cyan",
    RunStatus.SKIPPED: "dim",
}
PROGRESS_MIN_ITEMS = 200
PROBLEMS_SHOWN = 50  # per outcome in `runs show` without --items


class Progress:
    """A progress bar per step, shown on a terminal for long item lists only."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: rich_progress.Progress | None = None
        self._tasks: dict[str, rich_progress.TaskID] = {}

    def __enter__(self) -> Progress:
        if self.enabled:
            self._bar = rich_progress.Progress(
                rich_progress.TextColumn("{task.description}"),
                rich_progress.BarColumn(),
                rich_progress.MofNCompleteColumn(),
                rich_progress.TimeElapsedColumn(),
                console=stdout,
                transient=True,
            )
            self._bar.start()
        return self

    def __call__(self, step_id: str, done: int, total: int) -> None:
        if self._bar is None or total < PROGRESS_MIN_ITEMS:
            return
        if step_id not in self._tasks:
            self._tasks[step_id] = self._bar.add_task(step_id, total=total)
        self._bar.update(self._tasks[step_id], completed=done)

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        if self._bar is not None:
            self._bar.stop()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _duration(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def _status(status: str) -> str:
    style = STATUS_STYLE.get(status, "")
    return f"[{style}]{status}[/{style}]" if style else status


def _esc(text: object) -> str:
    from rich.markup import escape

    return escape(str(text))


# --- a finished run ----------------------------------------------------------------------


def result_json(result: RunResult) -> dict[str, Any]:
    return {
        "id": result.run_id,
        "workflow": result.workflow,
        "status": result.status,
        "error": result.error,
        "error_step": result.error_step,
        "items": result.counts,
        "outputs": [{"step": step, "summary": text} for step, text in result.summaries],
        "duration_s": round(result.duration_s, 3),
    }


def print_result(result: RunResult) -> None:
    c = result.counts
    stdout.print(
        f"Run [bold]{result.run_id}[/bold] of [bold]{_esc(result.workflow)}[/bold]: "
        f"{_status(result.status)} in {result.duration_s:.2f}s"
    )
    stdout.print(
        f"  items: {c['fetched']} fetched, {c['delivered']} delivered, {c['skipped']} skipped, "
        f"{c['quarantined']} quarantined, {c['failed']} failed"
    )
    for step, text in result.summaries:
        stdout.print(f"  {_esc(step)}: {_esc(text)}")
    if result.error:
        where = f" in {_esc(result.error_step)}" if result.error_step else ""
        stdout.print(f"  [red]error[/red]{where}: {_esc(result.error)}")
    stdout.print(f"  details: automator runs show {result.run_id}")


# --- lists and details -------------------------------------------------------------------


def run_json(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "workflow": run.workflow,
        "status": run.status,
        "trigger": run.trigger,
        "scheduled_for": _iso(run.scheduled_for),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "duration_s": _duration(run.started_at, run.finished_at),
        "version": run.workflow_version,
        "error": run.error,
        "error_step": run.error_step,
        "items": {
            "fetched": run.fetched,
            "delivered": run.delivered,
            "skipped": run.skipped,
            "quarantined": run.quarantined,
            "failed": run.failed,
        },
    }


def print_runs(runs: Sequence[Run], *, workflow: str | None = None, status: str | None = None) -> None:
    if not runs:
        if workflow is None and status is None:
            stdout.print("No runs recorded yet. Start one with: automator run FILE")
        else:
            wanted = " and ".join(
                part
                for part in (f"of workflow {workflow!r}" if workflow else "", f"with status {status}" if status else "")
                if part
            )
            stdout.print(f"No runs {_esc(wanted)}.")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("ID", "WORKFLOW", "STATUS", "TRIGGER", "STARTED", "TIME", "FETCHED", *[o.upper() for o in OUTCOMES]):
        table.add_column(
            column,
            justify="right"
            if column in ("ID", "TIME")
            or (column.isupper() and column in ("FETCHED", "DELIVERED", "SKIPPED", "QUARANTINED", "FAILED"))
            else "left",
        )
    for run in runs:
        seconds = _duration(run.started_at, run.finished_at)
        table.add_row(
            str(run.id),
            _esc(run.workflow),
            _status(run.status),
            run.trigger,
            run.started_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            f"{seconds:.1f}s" if seconds is not None else "-",
            str(run.fetched),
            str(run.delivered),
            str(run.skipped),
            str(run.quarantined),
            str(run.failed),
        )
    stdout.print(table)


def step_json(step: StepAttempt, usage: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One step row; ``usage`` is per step row (History.model_usage_by_attempt): calls counted once."""
    return {
        "step_id": step.step_id,
        "type": step.step_type,
        "phase": step.phase,
        "attempt": step.attempt,
        "status": step.status,
        "started_at": _iso(step.started_at),
        "finished_at": _iso(step.finished_at),
        "duration_s": _duration(step.started_at, step.finished_at),
        "items_in": step.items_in,
        "items_out": step.items_out,
        "retries": step.retries,
        "error": step.error,
        "summary": step.summary,
        "llm": usage.get(step.id),
    }


def item_json(item: LedgerItem) -> dict[str, Any]:
    return {
        "seq": item.seq,
        "key": item.key,
        "outcome": item.outcome,
        "step": item.step_id,
        "reason": item.reason,
        "item": item.result if item.result is not None else item.data,
    }


def run_detail_json(run: Run, items: Sequence[LedgerItem], usage: dict[int, dict[str, Any]]) -> dict[str, Any]:
    data = run_json(run)
    data["params"] = run.params
    data["steps"] = [step_json(s, usage) for s in run.steps]
    items = sorted(items, key=lambda i: i.seq)
    data["quarantined"] = [item_json(i) for i in items if i.outcome == Outcome.QUARANTINED]
    data["failed"] = [item_json(i) for i in items if i.outcome == Outcome.FAILED]
    data["ledger"] = [item_json(i) for i in items]
    return data


def print_run_detail(
    run: Run, items: Sequence[LedgerItem], usage: dict[int, dict[str, Any]], *, all_items: bool
) -> None:
    info = run_json(run)
    stdout.print(f"Run [bold]{run.id}[/bold] of [bold]{_esc(run.workflow)}[/bold]: {_status(run.status)}")
    stdout.print(f"  trigger {run.trigger}, version {run.workflow_version}, file {_esc(run.workflow_path or '-')}")
    started = run.started_at.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    took = f", took {info['duration_s']:.2f}s" if info["duration_s"] is not None else ""
    stdout.print(f"  started {started}{took}")
    if run.scheduled_for:
        stdout.print(f"  scheduled for {run.scheduled_for.astimezone().isoformat()}")
    counts = info["items"]
    stdout.print("  items: " + ", ".join(f"{counts[k]} {k}" for k in ("fetched", *OUTCOMES)))
    if run.error:
        stdout.print(f"  [red]error[/red]{' in ' + _esc(run.error_step) if run.error_step else ''}: {_esc(run.error)}")
    table = Table(title="steps", title_justify="left", box=None, pad_edge=False)
    for column in ("STEP", "TYPE", "TRY", "STATUS", "TIME", "IN", "OUT", "RETRIES", "NOTE"):
        table.add_column(column)
    for step in run.steps:
        seconds = _duration(step.started_at, step.finished_at)
        llm = usage.get(step.id)
        note = step.error or step.summary or ""
        if llm:
            note = (note + " " if note else "") + (
                f"model: {llm['calls']} calls, {llm['input_tokens']} in / {llm['output_tokens']} out, "
                f"${llm['cost_usd']:.6f}"
            )
        table.add_row(
            _esc(step.step_id),
            _esc(step.step_type),
            str(step.attempt),
            _status(step.status),
            f"{seconds:.2f}s" if seconds is not None else "-",
            str(step.items_in),
            str(step.items_out),
            str(step.retries),
            _esc(note),
        )
    stdout.print(table)
    for outcome in (Outcome.QUARANTINED, Outcome.FAILED) if not all_items else ("all",):
        # the ledger's order (item seq), whatever order the rows were read in
        chosen = sorted((i for i in items if outcome == "all" or i.outcome == outcome), key=lambda i: i.seq)
        if not chosen:
            continue
        # --items means every item; the summary of problems shows the first ones and says so
        shown = chosen if all_items else chosen[:PROBLEMS_SHOWN]
        stdout.print(f"[bold]{outcome} items[/bold] ({len(chosen)})")
        for item in shown:
            key = f" key {item.key}" if item.key is not None else ""
            status = f"{item.outcome} " if outcome == "all" else ""
            reason = f": {item.reason}" if item.reason else ""
            stdout.print(f"  #{item.seq}{_esc(key)} {status}at {_esc(item.step_id or '-')}{_esc(reason)}")
        if len(shown) < len(chosen):
            stdout.print(
                f"  showing the first {len(shown)} of {len(chosen)} {outcome} items; "
                f"all of them: automator runs show {run.id} --items (or --json)"
            )


def print_plugins(infos: Sequence[PluginInfo]) -> None:
    table = Table(box=None, pad_edge=False)
    for column in ("PLUGIN", "VERSION", "SOURCE", "STEP TYPES", "HOOKS"):
        table.add_column(column)
    for info in infos:
        if info.error:
            continue
        steps = ", ".join(f"{s.name} ({s.phase})" for s in info.steps) or "-"
        hooks = ", ".join(h for h in info.hooks if h != "register_step_types") or "-"
        table.add_row(_esc(info.name), _esc(info.version or "-"), info.source, _esc(steps), _esc(hooks))
    stdout.print(table)
    failed = [i for i in infos if i.error]
    for info in failed:
        where = _esc(info.location or "")
        stdout.print(f"[red]failed[/red] {_esc(info.name)} ({info.source}, {where}): {_esc(info.error)}")
