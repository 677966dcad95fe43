"""Every hook automator calls, in one place.

Plugins implement these with ``@automator.hookimpl``. Unless a hook says "first result
wins", every implementation is called and the results are collected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from automator.plugins.events import ItemOutcome, RunFinished, RunStarted, StepFinished, StepStarted
    from automator.plugins.steps import StepType
    from automator.spec.loader import Workflow

PROJECT = "automator"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- registration ----------------------------------------------------------------------


@hookspec
def register_step_types(register: Callable[[StepType], None]) -> None:
    """Called once at start-up; call ``register(StepClass)`` for each step type you provide.

    The class subclasses one of FetchStep, TransformStep, ValidateStep, DeliverStep and
    names itself (``name = "http.fetch"``). Registering a name twice is a plugin error.
    """


@hookspec
def register_template_filters(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Called once at start-up; call ``register(name, function)`` to add a Jinja2 filter."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Called when the command line starts; add click commands to ``cli``."""


# --- workflows -------------------------------------------------------------------------


@hookspec
def workflow_loaded(workflow: Workflow) -> list[str] | None:
    """Called after a workflow file passed every check; return problems to reject it.

    Each returned string is reported as an error at the top of the file (a policy such
    as "no webhooks outside our domain"). Return None or [] to accept it.
    """


@hookspec(firstresult=True)
def get_secret(name: str) -> str | None:
    """Called for ``{{ secrets.NAME }}`` before the environment is read; first result wins.

    Return the secret's value, or None to let others (and then the environment) answer.
    """


# --- lifecycle -------------------------------------------------------------------------


@hookspec
def run_started(event: RunStarted) -> None:
    """Called when a run starts, after it is recorded in the history."""


@hookspec
def run_finished(event: RunFinished) -> None:
    """Called when a run ends, whatever its status, after its outcome is recorded."""


@hookspec
def step_started(event: StepStarted) -> None:
    """Called before a step handles the run's items."""


@hookspec
def step_finished(event: StepFinished) -> None:
    """Called after a step, whether it succeeded or failed."""


@hookspec
def item_outcome(event: ItemOutcome) -> None:
    """Called once per item when its outcome (delivered, skipped, quarantined, failed) is known."""
