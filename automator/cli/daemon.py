"""``automator daemon`` (the long-running scheduler) and ``automator trigger NAME``."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import click

from automator.cli.common import default_plugins_dir, echo_json, settings, stderr, stdout
from automator.errors import AutomatorError, ConfigError
from automator.spec.durations import parse_duration

EXIT_OK, EXIT_FAILED = 0, 1


def _duration(_ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    if value is None or value.strip().lower() in ("forever", "never", "none", "0"):
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _interval(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    interval = _duration(ctx, param, value)
    if interval is None or interval.total_seconds() <= 0:
        raise click.BadParameter(f"{value!r}: give an interval such as 1h or 1d (use --keep forever to keep all)")
    return interval


def _address(_ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r}: write it as HOST:PORT, such as 127.0.0.1:9464", param=param)
    return host or "127.0.0.1", int(port)


@click.command()
@click.option(
    "--workflows",
    "workflows_dir",
    default="workflows",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The folder of workflow files; changes to it take effect within seconds.",
)
@click.option("--http", metavar="HOST:PORT", callback=_address, help="Serve /healthz and /metrics here.")
@click.option(
    "--grace", default="30s", show_default=True, callback=_duration, help="On SIGTERM, how long runs may finish."
)
@click.option(
    "--keep",
    default="30d",
    show_default=True,
    callback=_duration,
    help="Prune history older than this, daily ('forever' keeps everything).",
)
@click.option(
    "--prune-every",
    default="1d",
    callback=_interval,
    hidden=True,
    help="How often retention runs (for tests and operators; the first run is at most a minute after start).",
)
@click.option("--log-format", type=click.Choice(["json", "text"]), help="Default: text on a terminal, else JSON lines.")
@click.option("--check", is_flag=True, help="Validate the folder and exit (0 valid, 1 otherwise).")
@click.option(
    "--max-concurrent-runs", default=16, show_default=True, type=click.IntRange(1, 10000), help="Across workflows."
)
@click.pass_context
def daemon(
    ctx: click.Context,
    workflows_dir: Path,
    http: tuple[str, int] | None,
    grace: timedelta | None,
    keep: timedelta | None,
    prune_every: timedelta | None,
    log_format: str | None,
    check: bool,
    max_concurrent_runs: int,
) -> None:
    """Run every workflow in a folder on its schedule, until stopped (SIGTERM/SIGINT)."""
    if not workflows_dir.is_dir():
        raise ConfigError(f"the workflows folder {workflows_dir} does not exist", hint="pass --workflows DIR")
    opts = settings(ctx)
    plugins = opts.plugins(workflows_dir)
    if check:
        ctx.exit(_check(workflows_dir, plugins))
    from automator.daemon.logs import setup_logging
    from automator.daemon.service import Daemon, DaemonOptions

    setup_logging(log_format)  # type: ignore[arg-type]
    for failure in plugins.failures:
        import logging

        logging.getLogger("automator.daemon").warning("plugin %s was skipped: %s", failure.name, failure.error)
    history = opts.history(auto_upgrade=True)  # migrations run on daemon start
    options = DaemonOptions(
        workflows_dir=workflows_dir,
        http=http,
        grace=grace.total_seconds() if grace else 0.0,
        keep=keep,
        prune_every=prune_every or timedelta(days=1),
        max_concurrent_runs=max_concurrent_runs,
        plugins_dir=opts.plugins_dir or default_plugins_dir(workflows_dir),
    )
    code = asyncio.run(Daemon(options, history, plugins).serve())
    ctx.exit(code)


def _check(workflows_dir: Path, plugins: object) -> int:
    from automator.daemon.folder import WorkflowFolder
    from automator.plugins.manager import Plugins

    assert isinstance(plugins, Plugins)
    folder = WorkflowFolder(workflows_dir, plugins)
    import logging

    # the folder logs problems as it loads; --check prints them itself instead
    logging.getLogger("automator.daemon").disabled = True
    folder.scan()
    problems = sorted(p for found in folder.broken.values() for p in found)
    for problem in problems:
        stderr.print(str(problem), markup=False)
    for failure in plugins.failures:
        stderr.print(f"warning: plugin {failure.name} was skipped: {failure.error}", markup=False)
    total = len(folder.workflows) + len(folder.broken)
    if problems:
        stderr.print(f"{len(folder.broken)} of {total} workflow file(s) invalid.", markup=False)
        return EXIT_FAILED
    scheduled = sum(1 for wf in folder.workflows.values() if wf.spec.schedule is not None)
    stdout.print(f"{total} workflow file(s) valid, {scheduled} with a schedule.", markup=False)
    return EXIT_OK


@click.command()
@click.argument("name")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Set a workflow parameter.")
@click.option(
    "--timeout", default="10s", show_default=True, callback=_duration, help="How long to wait for the daemon."
)
@click.option("--json", "as_json", is_flag=True, help="Print {request, status, run_id, error} as JSON.")
@click.pass_context
def trigger(ctx: click.Context, name: str, params: tuple[str, ...], timeout: timedelta | None, as_json: bool) -> None:
    """Start a run of workflow NAME now, in the running daemon (recorded with trigger `manual`)."""
    from automator.cli.main import _parse_params
    from automator.daemon.control import request_run
    from automator.history.daemon_store import DaemonStore
    from automator.history.states import RequestStatus

    store = DaemonStore(settings(ctx).history())
    wait = timeout.total_seconds() if timeout else 10.0
    request = request_run(store, name, _parse_params(params), wait)
    if as_json:
        echo_json({"request": request.id, "status": request.status, "run_id": request.run_id, "error": request.error})
    if request.status == RequestStatus.REJECTED:
        raise ConfigError(f"the daemon refused to run {name}: {request.error}")
    if request.status == RequestStatus.CANCELLED:
        raise AutomatorError(
            f"no running daemon picked up the request within {wait:g}s",
            hint="start `automator daemon` on the same history database (AUTOMATOR_DATABASE_URL)",
        )
    if not as_json:
        if request.status == RequestStatus.STARTED:
            stdout.print(f"run {request.run_id} of {name} started (trigger manual)", markup=False)
        else:
            stdout.print(f"request {request.id} accepted: {name} waits for a free run slot", markup=False)
    ctx.exit(EXIT_OK)
