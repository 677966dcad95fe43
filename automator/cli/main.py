"""The ``automator`` command line: errors are rendered here, once, never as tracebacks."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from automator.cli import render
from automator.cli.common import (
    Settings,
    detect_abandoned_runs,
    echo_json,
    is_terminal,
    project_workflows_dir,
    settings,
    stderr,
    stdout,
    warn_skipped_plugins,
)
from automator.cli.costs import costs
from automator.cli.daemon import daemon, trigger
from automator.cli.export import export
from automator.daemon.logs import quiet_libraries, redact_handlers
from automator.engine.context import SECRET_ENV_PREFIX
from automator.engine.recovery import CrashRecovery, Orphan
from automator.errors import AutomatorError, ConfigError, Problem, WorkflowFileError
from automator.history import db
from automator.history.daemon_store import DaemonStore
from automator.history.states import Outcome
from automator.history.store import RUN_STATUSES
from automator.redaction import install_excepthooks, process_redactor, register_secrets
from automator.spec.loader import WORKFLOW_SUFFIXES, load_workflow
from automator.spec.yamlpos import YamlSyntaxError, load_located

if TYPE_CHECKING:
    from automator.engine.runner import Run, RunResult
    from automator.history.store import History
    from automator.spec.loader import Workflow

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
T = TypeVar("T")
WORKFLOWS_OPTION = click.option(
    "--workflows",
    type=click.Path(file_okay=False, path_type=Path),
    help="Use the plugins/ beside this folder of workflow files. Default: ./workflows, if it exists.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--database-url",
    envvar=db.ENV_URL,
    show_envvar=True,
    help="The run history database (any SQLAlchemy URL). Default: an embedded SQLite file.",
)
@click.option(
    "--plugins-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Load plugins (.py files) from here. Default: plugins/ beside the folder of the workflow files.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log what happens (to stderr).")
@click.version_option(package_name="automator")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, plugins_dir: Path | None, verbose: bool) -> None:
    """Declarative LLM workflow automation: workflow files in, runs and their history out."""
    opts = ctx.ensure_object(Settings)  # main() may have loaded the plugins already
    opts.database_url, opts.plugins_dir = database_url, plugins_dir
    ctx.call_on_close(opts.close)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet_libraries()
    redact_handlers(logging.getLogger())
    # known before any run reads them: a log line or an exported file is cleaned of them too
    register_secrets(v for k, v in os.environ.items() if k.startswith(SECRET_ENV_PREFIX))


def _parse_params(values: tuple[str, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not name:
            raise ConfigError(f"--param {value!r}: write it as NAME=VALUE")
        try:
            # the workflow loader's YAML: bounded, and a value it cannot read stays text
            params[name] = load_located(text).data if text else ""
        except YamlSyntaxError:
            params[name] = text
    return params


def _print_problems(problems: list[Problem]) -> None:
    for problem in problems:
        stderr.print(str(problem), markup=False)


# --- run ---------------------------------------------------------------------------------


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Set a workflow parameter.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--dry-run", is_flag=True, help="Call no model: count the tokens each model step would send, bound the cost."
)
@click.pass_context
def run(ctx: click.Context, file: Path, params: tuple[str, ...], as_json: bool, dry_run: bool) -> None:
    """Run a workflow once, now. Exit 0 succeeded, 1 failed, 2 invalid file.

    An unfinished run of the same workflow whose process is gone is first resumed (or, with
    ``on_crash: fail``, finished), as the daemon would; then the new run starts.

    Stopped by Ctrl-C, SIGTERM or SIGHUP, the run ends ``interrupted`` with every item's
    outcome recorded; the exit code is then 128 + the signal (130, 143, 129).
    """
    from automator.engine.runner import Run

    opts = settings(ctx)
    plugins = opts.plugins(file.parent)
    warn_skipped_plugins(plugins)
    try:
        workflow = load_workflow(file, plugins)
    except WorkflowFileError as exc:
        _print_problems(exc.problems)
        stderr.print(f"{file}: invalid, not run ({len(exc.problems)} problem(s)).", markup=False)
        ctx.exit(EXIT_INVALID)
    if dry_run:
        from automator.llm.estimate import dry_run as estimate_run

        estimate_run(workflow, opts.history(), plugins, _parse_params(params), as_json=as_json)
        ctx.exit(EXIT_OK)
    given = _parse_params(params)
    history = opts.history(detect_abandoned=False)  # this workflow's are taken over below
    _recover_unfinished_runs(ctx, workflow, history, as_json=as_json)
    detect_abandoned_runs(history)  # those of other workflows are only marked
    result = _execute(ctx, Run(workflow, history, plugins, params=given, trigger="cli"), None, as_json=as_json)
    _print_result(result, as_json=as_json)
    ctx.exit(EXIT_OK if result.succeeded else EXIT_FAILED)


def _execute(ctx: click.Context, the_run: Run, resume_id: int | None, *, as_json: bool) -> RunResult:
    """Execute (or resume) a run, a progress bar on a terminal; a stop signal exits 128 + it."""
    with render.Progress(enabled=is_terminal() and not as_json) as progress:
        the_run.progress = progress
        work = the_run.execute() if resume_id is None else the_run.resume(resume_id)
        stopped_by, result = _run_until_stopped(work)
    if stopped_by is not None:
        # the engine recorded the run as interrupted, every item with its outcome
        run_id = the_run.context.run_id if the_run.context is not None else None
        where = f"; see: automator runs show {run_id}" if run_id is not None else ""
        stderr.print(f"interrupted by {stopped_by.name}: the run is recorded as interrupted{where}", markup=False)
        ctx.exit(128 + stopped_by.value)
    assert result is not None
    return result


def _print_result(result: RunResult, *, as_json: bool) -> None:
    if as_json:
        echo_json(render.result_json(result))
    else:
        render.print_result(result)


def _recover_unfinished_runs(ctx: click.Context, workflow: Workflow, history: History, *, as_json: bool) -> None:
    """Resume, or finish per ``on_crash``, the runs of ``workflow`` whose process is gone (as the daemon does).

    Said on stderr; a resumed run's result is printed as a run's is (on stderr with
    ``--json``, whose output stays the new run's).
    """
    from automator.engine.runner import Run

    opts = settings(ctx)
    plugins = opts.plugins(workflow.path.parent)
    recovery = CrashRecovery(history, DaemonStore(history))
    for orphan in recovery.orphans(workflow.name):
        decision = recovery.take_over(orphan, workflow)
        if decision is None:
            continue  # another process took it over meanwhile
        if not decision.resume:
            stderr.print(f"finishing run {decision.run_id} of {workflow.name}: {decision.message}", markup=False)
            if decision.notify:  # tell someone, as for any failed run
                asyncio.run(Run(workflow, history, plugins).notify_failure(decision.run_id))
            continue
        stderr.print(f"resuming run {decision.run_id} of {workflow.name}, {orphan.reason}", markup=False)
        result = _execute(ctx, Run(workflow, history, plugins), decision.run_id, as_json=as_json)
        if as_json:
            error = f" ({result.error})" if result.error else ""
            stderr.print(f"run {result.run_id} resumed: {result.status}{error}", markup=False)
        else:
            render.print_result(result)


# --- resume ------------------------------------------------------------------------------


@cli.command()
@click.argument("run_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (as `automator run --json` does).")
@click.pass_context
def resume(ctx: click.Context, run_id: int, as_json: bool) -> None:
    """Resume a crashed or abandoned run in its own run id. Exit 0 succeeded, 1 failed or refused.

    The run continues on its workflow file (the one it started from, unchanged) with the
    items it had not finished; items another run delivered meanwhile are skipped. Refused
    for a finished run, an unknown id, and a run whose process is still alive. Exit 2 if
    the workflow file is now invalid.
    """
    from automator.engine.runner import Run

    opts = settings(ctx)
    history = opts.history(detect_abandoned=False)
    record = history.get_run(run_id)
    if record is None:
        raise ConfigError(f"no run with id {run_id}", hint="see `automator runs` for the ids")
    name = record.workflow
    run = next((r for r in history.unfinished_runs(name) if r.id == run_id), None)
    if run is None:
        raise ConfigError(f"run {run_id} of {name} is finished ({record.status}): there is nothing to resume")
    recovery = CrashRecovery(history, DaemonStore(history))
    reason = recovery.owner_gone(run)
    if reason is None:
        raise ConfigError(
            f"run {run_id} of {name} is {run.status} in a process that is still alive ({run.owner}): "
            "it is not abandoned",
            hint="stop that process first (a daemon resumes its own runs)",
        )
    path = Path(record.workflow_path) if record.workflow_path else None
    if path is None or not path.is_file():
        raise ConfigError(f"run {run_id} of {name}: its workflow file {path or '(not recorded)'} is not there")
    workflow = load_workflow(path, opts.plugins(path.parent))  # invalid: exit 2
    why_not = None if workflow.name == name else f"{path} is now workflow {workflow.name!r}"
    why_not = why_not or recovery.why_not_resumed(run, workflow, asked=True)
    if why_not is not None:
        raise ConfigError(
            f"run {run_id} of {name} cannot be resumed: {why_not}",
            hint=f"`automator run {path}` finishes it (its pending items fail) before it starts a new run",
        )
    decision = recovery.take_over(Orphan(run, reason), workflow, asked=True)
    if decision is None or not decision.resume:
        raise ConfigError(f"run {run_id} of {name} was taken over by another process meanwhile")
    stderr.print(f"resuming run {run_id} of {name}, {reason}", markup=False)
    result = _execute(ctx, Run(workflow, history, opts.plugins(path.parent)), run_id, as_json=as_json)
    _print_result(result, as_json=as_json)
    ctx.exit(EXIT_OK if result.succeeded else EXIT_FAILED)


# what Ctrl-C does, a service manager's stop (SIGTERM) and a closed terminal (SIGHUP) do too
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _run_until_stopped(work: Coroutine[Any, Any, T]) -> tuple[signal.Signals | None, T | None]:
    """Run ``work``; a stop signal cancels it, so that it records how far it got, and is returned."""
    received: list[signal.Signals] = []

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def stop(signum: signal.Signals) -> None:
            received.append(signum)
            task.cancel()

        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stop, signum)
        try:
            return await work
        finally:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)

    try:
        return None, asyncio.run(guarded())
    except asyncio.CancelledError:
        if not received:
            raise
        return received[0], None


# --- validate ----------------------------------------------------------------------------


def workflow_files(paths: tuple[Path, ...]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in WORKFLOW_SUFFIXES and p.is_file()))
        else:
            files.append(path)
    return files


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print problems as a JSON list of {file, line, column, message}.")
@click.pass_context
def validate(ctx: click.Context, paths: tuple[Path, ...], as_json: bool) -> None:
    """Check workflow files (or folders of them) offline. Exit 0 if all are valid, 1 otherwise."""
    opts = settings(ctx)
    problems: list[Problem] = []
    files = workflow_files(paths)
    for path in paths:
        if not path.exists():
            problems.append(Problem(str(path), 1, 1, "no such file or folder"))
    names: dict[str, Path] = {}
    for file in files:
        try:
            workflow = load_workflow(file, opts.plugins(file.parent))
        except WorkflowFileError as exc:
            problems.extend(exc.problems)
            continue
        if workflow.name in names:
            problems.append(
                Problem(str(file), 1, 1, f"workflow name {workflow.name!r} is already used by {names[workflow.name]}")
            )
        names[workflow.name] = file
    if as_json:
        echo_json([p.as_json() for p in sorted(problems)])
    else:
        _print_problems(sorted(problems))
        warn_skipped_plugins(*{id(p): p for p in (opts.plugins(f.parent) for f in files)}.values())
        bad = len({p.file for p in problems})
        if problems:
            stderr.print(f"{bad} of {len(files)} file(s) invalid, {len(problems)} problem(s).", markup=False)
        else:
            stdout.print(f"{len(files)} workflow file(s) valid.", markup=False)
    ctx.exit(EXIT_FAILED if problems else EXIT_OK)


# --- runs --------------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@click.option("--workflow", help="Only runs of this workflow.")
@click.option("--status", type=click.Choice(RUN_STATUSES), help="Only runs with this status.")
@click.option(
    "--limit", default=20, show_default=True, type=click.IntRange(1, 10000), help="At most this many runs (1-10000)."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_context
def runs(ctx: click.Context, workflow: str | None, status: str | None, limit: int, as_json: bool) -> None:
    """List recent runs, newest first (see also: automator runs show ID)."""
    if ctx.invoked_subcommand is not None:
        return
    found = settings(ctx).history().list_runs(workflow=workflow, status=status, limit=limit)
    if as_json:
        echo_json([render.run_json(r) for r in found])
    else:
        render.print_runs(found, workflow=workflow, status=status)


@runs.command("show")
@click.argument("run_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@click.option(
    "--items", "show_items", is_flag=True, help="List every item of the ledger (all of them), not only the problems."
)
@click.pass_context
def runs_show(ctx: click.Context, run_id: int, as_json: bool, show_items: bool) -> None:
    """Show one run: its steps, attempts, errors, and quarantined and failed items."""
    history = settings(ctx).history()
    found = history.get_run(run_id)
    if found is None:
        raise ConfigError(f"no run with id {run_id}", hint="see `automator runs` for the ids")
    outcomes = None if show_items or as_json else [Outcome.QUARANTINED, Outcome.FAILED]
    items = history.items(run_id, outcomes)
    usage = history.model_usage_by_attempt(run_id)
    if as_json:
        echo_json(render.run_detail_json(found, items, usage))
    else:
        render.print_run_detail(found, items, usage, all_items=show_items)


# --- plugins, schema, db -----------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {name, version, source, hooks, steps}.")
@WORKFLOWS_OPTION
@click.pass_context
def plugins(ctx: click.Context, as_json: bool, workflows: Path | None) -> None:
    """List the installed plugins, their step types, and plugins that failed to load."""
    loaded = settings(ctx).plugins(workflows or project_workflows_dir())
    infos = list(loaded.infos.values())
    if as_json:
        echo_json([info.as_json() for info in infos])
    else:
        render.print_plugins(infos)


@cli.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file.")
@WORKFLOWS_OPTION
@click.option("--builtin-only", is_flag=True, help="Only the standard step types, whatever else is installed.")
@click.pass_context
def schema(ctx: click.Context, output: Path | None, workflows: Path | None, builtin_only: bool) -> None:
    """Print the JSON Schema of workflow files, with every installed step type's settings."""
    import json

    from automator.plugins.manager import Plugins
    from automator.spec.schema import workflow_json_schema

    if builtin_only:
        loaded = Plugins()
        loaded.load_builtins()
    else:
        loaded = settings(ctx).plugins(workflows or project_workflows_dir())
        warn_skipped_plugins(loaded)
    text = json.dumps(workflow_json_schema(loaded), indent=2) + "\n"
    if output:
        output.write_text(text, encoding="utf-8")
        stderr.print(f"wrote {output}", markup=False)
    else:
        click.echo(text, nl=False)


@cli.group("db")
def db_group() -> None:
    """Manage the run history database."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target migration.")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Create or migrate the history database's tables."""
    opts = settings(ctx)
    # asked to create the history: a new SQLite file's folder may be made too
    engine = db.open_engine(db.database_url(opts.database_url), create_folder=True)
    try:
        before = db.current_revision(engine)
        db.upgrade(engine, revision)
        after = db.current_revision(engine)
    finally:
        engine.dispose()
    if before == after:
        stdout.print(f"history database is up to date (revision {after})", markup=False)
    else:
        stdout.print(f"history database upgraded: {before or 'empty'} -> {after}", markup=False)


@db_group.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the history database's schema revision and the newest one."""
    engine = db.open_engine(db.database_url(settings(ctx).database_url))
    try:
        stdout.print(f"current: {db.current_revision(engine) or 'none'}  newest: {db.head_revision()}", markup=False)
    finally:
        engine.dispose()


# --- commands from other modules ---
cli.add_command(costs)
cli.add_command(daemon)
cli.add_command(trigger)
cli.add_command(export)


def _plugins_dir_option(argv: list[str]) -> Path | None:
    """``--plugins-dir`` read ahead of click: plugin commands must exist before parsing."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--plugins-dir" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--plugins-dir="):
            return Path(arg.split("=", 1)[1])
    return None


def command_line(argv: list[str], plugins: Sequence[object] = ()) -> tuple[click.Group, Settings]:
    """This call's command group: the built-in commands and those of the project's plugins.

    Built per call from ``cli`` (which only ever holds the built-in commands), so a
    plugin's commands never outlive the call that loaded the plugin. The plugins are
    those of ``--plugins-dir``, else of ``plugins/`` beside ``./workflows`` (the folder
    the daemon, ``plugins`` and ``schema`` default to); ``plugins`` adds plugin objects
    (``automator.testing``). They are kept for the command, which reuses them when it
    asks for the same plugins folder.
    """
    opts = Settings(plugins_dir=_plugins_dir_option(argv), extra_plugins=tuple(plugins))
    group = copy.copy(cli)
    group.commands = dict(cli.commands)
    opts.plugins(project_workflows_dir()).register_commands(group)
    return group, opts


def main(argv: list[str] | None = None, *, plugins: Sequence[object] = ()) -> int:
    """The console script: run the CLI and render AutomatorError once, without a traceback.

    ``plugins``: plugin objects to load besides the discovered ones (for tests).
    """
    install_excepthooks()  # a traceback that escapes anyway shows no secret
    try:
        group, opts = command_line(sys.argv[1:] if argv is None else argv, plugins)
        # without standalone mode click returns ctx.exit()'s code instead of exiting
        code = group.main(args=argv, prog_name="automator", standalone_mode=False, obj=opts)
    except WorkflowFileError as exc:
        _print_problems(exc.problems)
        return EXIT_INVALID
    except AutomatorError as exc:
        # an error from outside a run (a --dry-run fetch, say) may quote a secret it read
        redact = process_redactor().text
        stderr.print(f"error: {redact(exc.message)}", markup=False)
        if exc.hint:
            stderr.print(f"hint: {redact(exc.hint)}", markup=False)
        return EXIT_FAILED
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        stderr.print("aborted", markup=False)
        return 130
    except KeyboardInterrupt:
        stderr.print("interrupted", markup=False)
        return 130
    except SystemExit as exc:
        # sys.exit() in a (plugin's) command: its code, as the console script would exit with
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or EXIT_OK
        stderr.print(str(exc.code), markup=False)
        return EXIT_FAILED
    return code if isinstance(code, int) else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
