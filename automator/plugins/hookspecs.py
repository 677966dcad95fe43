"""Every hook automator calls, in one place.

Plugins implement hooks with ``@automator.hookimpl`` on module-level functions (or
methods of a plugin object), naming the function after the hook. An implementation
may accept fewer arguments than the hook offers, never others: a misspelt argument
is reported when the plugin loads, with the plugin's name.

Unless a hook says "first result wins", every implementation is called (the most
recently registered first) and their results are collected. Core code calls them
through :class:`automator.plugins.manager.Plugins`, a typed facade that calls
``pm.hook`` (so pluggy's ordering, ``firstresult`` and tracing apply) and keeps one
broken plugin from breaking a run or the command line. Plugins' hook wrappers are not
supported.

docs/plugins.md documents each hook for plugin authors; a test fails when a hook here
is missing from it or is implemented by no test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from automator.plugins.events import ItemOutcome, Rejection, RunFinished, RunStarted, StepFinished, StepStarted
    from automator.plugins.steps import StepType
    from automator.spec.loader import Workflow

PROJECT = "automator"
# The spec marker stays private: plugins only ever need ``hookimpl``.
_hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------------------
# Registration: called once, when the plugins load
# ---------------------------------------------------------------------------------------


@_hookspec
def register_step_types(register: Callable[[StepType], None]) -> None:
    """Register the step types this plugin provides.

    Called once per plugin while plugins load, before any workflow file is read.

    :param register: call ``register(StepClass)`` once per step type. The class
        subclasses one of ``FetchStep``, ``TransformStep``, ``ValidateStep`` or
        ``DeliverStep`` (that gives its phase), sets ``name`` (``"acme.fetch"``), and
        declares its ``with:`` settings as a ``StepConfig`` model, usually through the
        type argument: ``class AcmeFetch(FetchStep[AcmeConfig])``.

    A name registered by two plugins, a class that is not a step type, or a step type
    missing its phase method makes the plugin fail to load; it is reported by
    ``automator plugins`` and skipped, and the other plugins load normally.
    """


@_hookspec
def register_template_filters(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Add Jinja2 filters to every workflow template: ``{{ item.title | slugify }}``.

    Called once per plugin while plugins load.

    :param register: call ``register(name, function)`` per filter. The function gets
        the value left of the ``|`` first, then the filter's arguments. Templates run
        in a sandbox, but a filter is ordinary Python: keep it free of side effects.

    A filter name already registered by another plugin makes this plugin fail to load.
    """


@_hookspec
def register_template_globals(register: Callable[[str, Any], None]) -> None:
    """Add names to every workflow template: ``{{ today() }}``, ``{{ company.name }}``.

    Called once per plugin while plugins load, so ``automator validate`` knows the
    names too and does not report them as unknown.

    :param register: call ``register(name, value)`` per name; the value may be a
        constant or a function. The names ``item``, ``steps``, ``run``, ``secrets`` and
        ``params`` are the run's own and cannot be registered.
    """


@_hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``automator`` command line.

    Called each time the command line starts, before it parses its arguments, with a
    group built for that call: the commands last as long as the call. The plugins are
    those of ``--plugins-dir``, else of ``plugins/`` beside ``./workflows``.

    :param cli: the top-level click group; call ``cli.add_command(my_command)``. Give
        the command a name unlikely to clash with later built-in ones (prefix it with
        your plugin's name). Use ``automator.cli.common.settings(ctx)`` in the command
        to open the same history database and plugins as the built-in commands.

    A plugin that raises here is reported (``automator plugins``) and the command line
    still starts.
    """


# ---------------------------------------------------------------------------------------
# Workflows and secrets: called while a workflow file loads or a run renders templates
# ---------------------------------------------------------------------------------------


@_hookspec
def workflow_loaded(workflow: Workflow) -> list[str | Rejection] | None:
    """Check or adjust a workflow that passed every built-in check; a policy hook.

    Called by ``automator validate``, ``automator run`` and the daemon each time a
    workflow file is loaded, after its steps are bound and their configs validated.

    :param workflow: the loaded workflow: ``workflow.spec`` (the whole file as a
        model), ``workflow.steps`` and ``workflow.on_failure`` (each a ``BoundStep``
        with ``.id``, ``.type``, ``.phase`` and ``.config``, the step's validated
        ``StepConfig``), ``workflow.path`` and ``workflow.name``.

    Return problems to reject the workflow: each is a string (reported at the top of
    the file) or a ``Rejection(message, step="notify", field="url")`` (reported at that
    step's setting); every problem is shown as ``FILE:LINE:COL: message (plugin P)``,
    and the file counts as invalid. Return ``None`` or ``[]`` to accept it.

    To adjust the workflow, change it in place: replace a step's config with a
    re-validated copy, ``step.config = type(step.config).model_validate({...})``, or
    set fields on ``workflow.spec``. The run uses the adjusted workflow; its recorded
    version stays the hash of the file as written.

    Every implementation is called; all problems are reported together. A plugin
    that raises is reported as a problem of the file, naming the plugin.
    """


@_hookspec(firstresult=True)
def get_secret(name: str) -> str | None:
    """Provide the value of ``{{ secrets.NAME }}`` from a vault, a file, a keyring.

    Called each time a run renders a template that reads a secret, before the
    environment (``$AUTOMATOR_SECRET_NAME``, then ``$NAME``) is consulted. Called
    often: cache what is expensive to fetch.

    :param name: the secret's name as written in the template.

    First result wins: return the value, or ``None`` to let the next provider (and
    finally the environment) answer. The value is redacted from everything the run
    writes: history, logs, errors, events.
    """


# ---------------------------------------------------------------------------------------
# Lifecycle: called while a run runs, to observe and notify (return values are ignored)
#
# Each event is a frozen dataclass from automator.plugins.events. A listener that
# raises is logged with its plugin's name and the run goes on: observers never change
# a run's outcome. Listeners run on the run's event loop thread: hand slow work
# (a network call) to a thread or a queue of your own.
# ---------------------------------------------------------------------------------------


@_hookspec
def run_started(event: RunStarted) -> None:
    """A run started.

    Called once per run, after the run is recorded in the history and before its
    first step. ``event.run`` (a ``RunInfo``) has the run's id, workflow, trigger
    (cli, schedule, catch_up, ...), start time, workflow version and scheduled time.
    A run resumed after its process died is heard again, with ``event.run.resumed``.
    """


@_hookspec
def run_finished(event: RunFinished) -> None:
    """A run ended, whatever its status.

    Called once per run, after its outcome and every item's outcome are recorded.
    ``event.status`` is succeeded, failed, timed_out or interrupted; ``event.error``
    the reason (secrets redacted); ``event.counts`` the fetched, delivered, skipped,
    quarantined and failed item counts; ``event.duration_s`` the run's duration.
    """


@_hookspec
def step_started(event: StepStarted) -> None:
    """A step is about to handle the run's items.

    Called once per step of a run (and per ``on_failure`` step), before the step's
    first call: when the first chunk of items reaches it (items stream through the
    steps in chunks, so later steps start while earlier ones go on). ``event.step_id``,
    ``event.step_type``, ``event.phase`` and ``event.items_in`` (the first chunk's
    items; 0 for a fetch step) describe it; ``step_finished`` has the step's totals.
    """


@_hookspec
def step_finished(event: StepFinished) -> None:
    """A step is done, whether it succeeded or failed.

    Called once per ``step_started``. ``event.status`` is succeeded or failed (a step
    succeeds even if some items failed in it); ``event.error`` the reason (secrets
    redacted); ``event.items_in`` / ``event.items_out`` how many items entered and
    left it; ``event.duration_s`` its duration.
    """


@_hookspec
def item_outcome(event: ItemOutcome) -> None:
    """An item reached its one outcome: delivered, skipped, quarantined or failed.

    Called exactly once per item a fetch produced, in the order outcomes are known.
    ``event.key`` is the item's key (or None), ``event.step_id`` the step where it
    ended, ``event.reason`` why (secrets redacted), ``event.data`` the item's data as
    it ended. Runs that no plugin listens to skip building these events, so
    implementing this hook has a cost on runs with many items: keep it cheap.
    """
