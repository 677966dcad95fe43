"""Finding, loading and calling plugins: a typed facade over pluggy.

Core code calls ``plugins.run_started(event)`` and friends, never ``pm.hook.x``
untyped. The facade calls every hook through ``pm.hook`` (or, for the registration
hooks, pluggy's ``subset_hook_caller`` narrowed to the plugin being loaded), so pluggy
orders the implementations, honours ``firstresult``, and its tracing
(``pm.enable_tracing()``, ``pm.add_hookcall_monitoring()``) sees every call.

One broken plugin never breaks the others:

- a plugin that fails to import, register or declare itself is recorded in
  ``failures`` (shown by ``automator plugins``) and skipped;
- a lifecycle listener that raises is logged with its plugin's name and the other
  listeners still hear the event; the run goes on;
- a ``workflow_loaded`` policy that raises becomes a problem of the workflow file,
  naming the plugin; a ``get_secret`` provider that raises fails the step, naming it;
- a ``register_commands`` implementation that raises is recorded as that plugin's
  failure and the command line still starts.

Why not a hook wrapper: pluggy runs a hook's implementations in one loop and the first
exception ends that loop, so a wrapper (old- or new-style) around the call sees the
error only after the remaining listeners were skipped. Isolation has to sit around
each implementation instead: when a plugin registers, :meth:`Plugins.add` replaces the
``function`` of each of its ``HookImpl`` records with a guard that knows the plugin's
name (``_guard``). pluggy still does the calling; the guard only turns a failure into
that plugin's own log line, problem, or error. Plugins' own hook wrappers are refused
(a guard cannot wrap a generator, and the hooks here have nothing to wrap).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from automator import templates
from automator.errors import PluginError, StepError
from automator.plugins import hookspecs
from automator.plugins.events import ItemOutcome, Rejection, RunFinished, RunStarted, StepFinished, StepStarted
from automator.plugins.steps import (
    PHASE_METHOD,
    DeliverStep,
    FetchStep,
    Phase,
    Step,
    StepConfig,
    StepType,
    TransformStep,
    ValidateStep,
)

if TYPE_CHECKING:
    import click

    from automator.spec.loader import Workflow
    from automator.spec.yamlpos import Path as YamlPath

log = logging.getLogger(__name__)

_PHASE_BASE: dict[Phase, type[Step[Any]]] = {
    Phase.FETCH: FetchStep,
    Phase.TRANSFORM: TransformStep,
    Phase.VALIDATE: ValidateStep,
    Phase.DELIVER: DeliverStep,
}

ENTRY_POINT_GROUP = "automator"

# The standard step types: ordinary plugins, loaded by module name like any other.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "automator_standard.http_fetch",
    "automator_standard.file_fetch",
    "automator_standard.template_transform",
    "automator_standard.schema_validate",
    "automator_standard.file_deliver",
    "automator_standard.webhook_deliver",
    "automator_standard.openai_transform",
)


@dataclass
class PluginInfo:
    """One plugin as ``automator plugins`` shows it, loaded or failed."""

    name: str
    source: str  # built-in | entry point | directory | test
    version: str | None = None
    location: str | None = None  # module file, entry point target, or .py path
    hooks: list[str] = field(default_factory=list)
    steps: list[StepType] = field(default_factory=list)
    template_filters: list[str] = field(default_factory=list)
    template_globals: list[str] = field(default_factory=list)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The ``automator plugins --json`` shape.

        {name, version, source, location, hooks, steps: [{name, phase, description}],
        template_filters, template_globals, error (only for a plugin that failed to load)}.
        """
        data: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "location": self.location,
            "hooks": self.hooks,
            "steps": [{"name": s.name, "phase": str(s.phase), "description": s.description} for s in self.steps],
            "template_filters": self.template_filters,
            "template_globals": self.template_globals,
        }
        if self.error:
            data["error"] = self.error
        return data


def _names_from_env(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _automator_version() -> str | None:
    try:
        return importlib.metadata.version("automator")
    except importlib.metadata.PackageNotFoundError:
        return None


class Plugins:
    """The loaded plugins, their step types, and typed calls of every hook."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.step_types: dict[str, StepType] = {}
        self.step_plugin: dict[str, str] = {}
        self.filter_plugin: dict[str, str] = {}
        self.global_plugin: dict[str, str] = {}
        # templates belong to this set of plugins: their filters and globals, and no others
        self.templates = templates.Templates()
        self._only = _names_from_env("AUTOMATOR_PLUGINS")
        self._disabled = _names_from_env("AUTOMATOR_DISABLE_PLUGINS") or set()

    # -- loading ----------------------------------------------------------------------

    @property
    def failures(self) -> list[PluginInfo]:
        return [info for info in self.infos.values() if info.error]

    def _wanted(self, name: str) -> bool:
        if name in self._disabled:
            return False
        return self._only is None or name in self._only

    def add(self, plugin: object, info: PluginInfo) -> bool:
        """Register one plugin object (a module or an instance); False if it was refused."""
        if not self._wanted(info.name):
            return False
        if info.name in self.infos and not self.infos[info.name].error:
            info.error = f"a plugin named {info.name!r} is already loaded from {self.infos[info.name].location}"
            self.infos[f"{info.name} ({info.location})"] = info
            return False
        self.infos[info.name] = info
        if self.pm.is_registered(plugin):
            info.error = f"the same plugin object is already loaded as {self.pm.get_name(plugin)!r}"
            return False
        try:
            self.pm.register(plugin, name=info.name)
        except pluggy.PluginValidationError as exc:
            # pluggy leaves the hooks it verified before the bad one registered: undo them
            self._forget(info.name)
            info.error = _describe_validation_error(exc)
            return False
        except ValueError as exc:
            self._forget(info.name)
            info.error = f"cannot register: {exc}".splitlines()[0]
            return False
        callers = self.pm.get_hookcallers(plugin) or []
        unknown = sorted(hc.name for hc in callers if not hc.has_spec())
        wrappers = sorted(
            hc.name for hc in callers for impl in hc.get_hookimpls() if impl.plugin is plugin and _is_wrapper(impl)
        )
        if unknown or wrappers:
            self._forget(info.name)
            info.error = (
                f"implements unknown hook(s) {', '.join(unknown)}; see docs/plugins.md for the hook names"
                if unknown
                else f"hook wrappers are not supported ({', '.join(wrappers)}); implement the hook plainly"
            )
            return False
        info.hooks = sorted(hc.name for hc in callers)
        self._guard(plugin, info.name)
        try:
            self._register_things(plugin, info)
        except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, never fatal
            info.error = _describe(exc)
            self._forget(info.name)
            return False
        return True

    def _forget(self, name: str) -> None:
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)

    def _hook_of(self, hook_name: str, plugin: object) -> pluggy.HookCaller:
        """The hook narrowed to one plugin: what it registers is traced back to it."""
        others = [other for other in self.pm.get_plugins() if other is not plugin]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)

    def _guard(self, plugin: object, name: str) -> None:
        """Make each of the plugin's hook implementations fail on its own (see the module docstring)."""
        for caller in self.pm.get_hookcallers(plugin) or []:
            guard = _GUARDS.get(caller.name)
            if guard is None:
                continue  # registration hooks: a failure there refuses the whole plugin
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin:
                    # typed Final by pluggy; replacing it is how each implementation is isolated
                    impl.function = guard(self, name, caller.name, impl.function)  # type: ignore[misc]

    def _register_things(self, plugin: object, info: PluginInfo) -> None:
        """Call the plugin's register_* hooks; all checks pass before anything is kept."""
        steps: list[StepType] = []
        filters: dict[str, Callable[..., Any]] = {}
        globals_: dict[str, Any] = {}

        def add_filter(name: str, function: Callable[..., Any]) -> None:
            if not isinstance(name, str) or not name.isidentifier():
                raise PluginError(f"template filter name {name!r} is not an identifier")
            if not callable(function):
                raise PluginError(f"template filter {name!r} is not callable")
            if name in self.filter_plugin or name in filters:
                owner = self.filter_plugin.get(name, info.name)
                raise PluginError(f"template filter {name!r} is already registered by plugin {owner!r}")
            filters[name] = function

        def add_global(name: str, value: Any) -> None:
            if not isinstance(name, str) or not name.isidentifier():
                raise PluginError(f"template global name {name!r} is not an identifier")
            if name in templates.CONTEXT_NAMES:
                raise PluginError(f"template global {name!r} is reserved for the run's own data")
            if name in self.global_plugin or name in globals_:
                owner = self.global_plugin.get(name, info.name)
                raise PluginError(f"template global {name!r} is already registered by plugin {owner!r}")
            globals_[name] = value

        self._hook_of("register_step_types", plugin)(register=steps.append)
        seen: set[str] = set()
        for step_type in steps:
            _check_step_type(step_type)
            if step_type.name in self.step_types or step_type.name in seen:
                owner = self.step_plugin.get(step_type.name, info.name)
                raise PluginError(f"step type {step_type.name!r} is already registered by plugin {owner!r}")
            seen.add(step_type.name)
        self._hook_of("register_template_filters", plugin)(register=add_filter)
        self._hook_of("register_template_globals", plugin)(register=add_global)

        for step_type in steps:
            self.step_types[step_type.name] = step_type
            self.step_plugin[step_type.name] = info.name
        self.filter_plugin.update(dict.fromkeys(filters, info.name))
        self.global_plugin.update(dict.fromkeys(globals_, info.name))
        info.steps = steps
        info.template_filters = sorted(filters)
        info.template_globals = sorted(globals_)
        if filters:
            self.templates.add_filters(filters)
        if globals_:
            self.templates.add_globals(globals_)

    def load_module(self, module_name: str, source: str, version: str | None) -> None:
        info = PluginInfo(name=module_name, source=source, version=version, location=module_name)
        if not self._wanted(module_name):
            return
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - import errors of plugins are reported
            info.error = _describe(exc)
            self.infos[module_name] = info
            return
        info.location = getattr(module, "__file__", module_name)
        self.add(module, info)

    def load_builtins(self) -> None:
        for module_name in BUILTIN_PLUGINS:
            self.load_module(module_name, "built-in", _automator_version())

    def load_entry_points(self) -> None:
        """Plugins of installed distributions: entry points in the group ``automator``."""
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            info = PluginInfo(
                name=ep.name,
                source="entry point",
                version=dist.version if dist else None,
                location=ep.value,
            )
            if not self._wanted(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - pluggy would let this escape; we report it
                info.error = _describe(exc)
                self.infos[ep.name] = info
                continue
            self.add(plugin, info)

    def load_directory(self, directory: Path) -> None:
        """Plain ``.py`` files in a plugins directory, each one plugin named after its file."""
        if not directory.is_dir():
            return
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith("_"):
                continue
            name = path.stem
            info = PluginInfo(name=name, source="directory", location=str(path))
            if not self._wanted(name):
                continue
            module_name = f"automator_plugins_dir.{name}"
            try:
                spec = importlib.util.spec_from_file_location(module_name, path)
                if spec is None or spec.loader is None:
                    raise PluginError(f"cannot load {path}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
            except Exception as exc:  # noqa: BLE001 - a broken plugin file is reported and skipped
                sys.modules.pop(module_name, None)
                info.error = _describe(exc)
                self.infos[name] = info
                continue
            info.version = getattr(module, "__version__", None)
            self.add(module, info)

    # -- lookups ----------------------------------------------------------------------

    def step_type(self, name: str) -> StepType | None:
        return self.step_types.get(name)

    # -- typed hook calls -------------------------------------------------------------

    def workflow_loaded(self, workflow: Workflow) -> list[tuple[YamlPath, str]]:
        """Every policy's problems with ``workflow``, each with where it is in the file."""
        problems: list[tuple[YamlPath, str]] = []
        answers: list[_PolicyAnswer] = self.pm.hook.workflow_loaded(workflow=workflow)
        for answer in answers:
            if answer.failure is not None:
                problems.append(((), f"plugin {answer.plugin} failed while checking the workflow: {answer.failure}"))
            for problem in answer.problems:
                problems.append(_locate(workflow, problem, answer.plugin))
        return problems

    def get_secret(self, name: str) -> str | None:
        """The first secrets plugin's answer for ``name``, or None (``firstresult``)."""
        try:
            value = self.pm.hook.get_secret(name=name)
        except _ProviderFailed as failed:
            # the plugin's own message could quote the secret: only its type is shown
            raise StepError(f"secrets plugin {failed.plugin} failed to provide {name!r} ({failed.kind})") from None
        return None if value is None else str(value)

    def register_commands(self, cli: click.Group) -> None:
        """Let plugins add commands; a plugin that fails here is recorded, the others still run."""
        self.pm.hook.register_commands(cli=cli)

    def _command_failed(self, plugin: str, exc: Exception) -> None:
        message = f"register_commands failed: {_describe(exc)}"
        info = self.infos.get(plugin)
        if info is not None:
            info.error = message
        log.warning("plugin %s: %s", plugin, message)

    def run_started(self, event: RunStarted) -> None:
        self.pm.hook.run_started(event=event)

    def run_finished(self, event: RunFinished) -> None:
        self.pm.hook.run_finished(event=event)

    def step_started(self, event: StepStarted) -> None:
        self.pm.hook.step_started(event=event)

    def step_finished(self, event: StepFinished) -> None:
        self.pm.hook.step_finished(event=event)

    @property
    def wants_item_events(self) -> bool:
        return bool(self.pm.hook.item_outcome.get_hookimpls())

    def item_outcome(self, event: ItemOutcome) -> None:
        self.pm.hook.item_outcome(event=event)


# -- the guards around each plugin's hook implementations --------------------------------

Implementation = Callable[..., Any]


@dataclass
class _PolicyAnswer:
    """One ``workflow_loaded`` implementation's answer, tagged with its plugin (never None)."""

    plugin: str
    problems: list[str | Rejection] = field(default_factory=list)
    failure: str | None = None


def _guard_listener(plugins: Plugins, plugin: str, hook: str, function: Implementation) -> Implementation:
    def listener(*args: Any) -> None:
        try:
            function(*args)
        except Exception as exc:  # noqa: BLE001 - an observer never changes a run's outcome
            log.warning("plugin %s: %s listener failed: %s", plugin, hook, _describe(exc))

    return listener


def _guard_policy(plugins: Plugins, plugin: str, hook: str, function: Implementation) -> Implementation:
    def policy(*args: Any) -> _PolicyAnswer:
        try:
            result = function(*args)
        except Exception as exc:  # noqa: BLE001 - a failing policy is the file's problem, named
            return _PolicyAnswer(plugin, failure=_describe(exc))
        return _PolicyAnswer(plugin, problems=list(result or []))

    return policy


class _ProviderFailed(Exception):  # noqa: N818 - internal, becomes a StepError naming the secret
    def __init__(self, plugin: str, kind: str) -> None:
        super().__init__(plugin, kind)
        self.plugin, self.kind = plugin, kind


def _guard_secrets(plugins: Plugins, plugin: str, hook: str, function: Implementation) -> Implementation:
    def provider(*args: Any) -> Any:
        try:
            return function(*args)
        except Exception as exc:  # noqa: BLE001 - reported as a (retryable) step failure, named
            raise _ProviderFailed(plugin, type(exc).__name__) from None

    return provider


def _guard_commands(plugins: Plugins, plugin: str, hook: str, function: Implementation) -> Implementation:
    def commands(*args: Any) -> None:
        try:
            function(*args)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the CLI
            plugins._command_failed(plugin, exc)

    return commands


_GUARDS: dict[str, Callable[[Plugins, str, str, Implementation], Implementation]] = {
    "run_started": _guard_listener,
    "run_finished": _guard_listener,
    "step_started": _guard_listener,
    "step_finished": _guard_listener,
    "item_outcome": _guard_listener,
    "workflow_loaded": _guard_policy,
    "get_secret": _guard_secrets,
    "register_commands": _guard_commands,
}


def _is_wrapper(impl: pluggy.HookImpl) -> bool:
    return bool(getattr(impl, "hookwrapper", False) or getattr(impl, "wrapper", False))


def _locate(workflow: Workflow, problem: str | Rejection, plugin_name: str) -> tuple[YamlPath, str]:
    """Where a policy's problem is in the file: a step's setting, a step, or the top."""
    if not isinstance(problem, Rejection):
        return (), f"{problem} (plugin {plugin_name})"
    message = f"{problem.message} (plugin {plugin_name})"
    if problem.step is None:
        return (), message
    for section, steps in (("steps", workflow.steps), ("on_failure", workflow.on_failure)):
        for index, step in enumerate(steps):
            if step.id == problem.step:
                path: YamlPath = (section, index)
                if problem.field:
                    path = (*path, "with", *problem.field.split("."))
                return path, message
    return (), f"{message} [step {problem.step!r}]"


def _check_step_type(step_type: Any) -> None:
    if not (isinstance(step_type, type) and issubclass(step_type, Step)):
        raise PluginError(f"{step_type!r} is not a step type (subclass FetchStep, TransformStep, ...)")
    name = getattr(step_type, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"step type {step_type.__name__} has no name")
    if getattr(step_type, "phase", None) not in set(Phase):
        raise PluginError(f"step type {name!r} has no phase (subclass FetchStep, TransformStep, ...)")
    config = getattr(step_type, "Config", None)
    if not (isinstance(config, type) and issubclass(config, StepConfig)):
        raise PluginError(f"step type {name!r}: Config must subclass automator.StepConfig")
    method = PHASE_METHOD[step_type.phase]
    base = _PHASE_BASE[step_type.phase]
    has_batch = step_type.phase is Phase.DELIVER and getattr(step_type, "deliver_batch", None)
    if getattr(step_type, method) is getattr(base, method) and not has_batch:
        raise PluginError(f"step type {name!r} does not implement {method}()")


def _describe_validation_error(exc: pluggy.PluginValidationError) -> str:
    """pluggy's multi-line message as one line: the hook as written, and as it should be."""
    text = " ".join(str(exc).split())
    match = re.search(r"hookimpl definition: (\w+)\(", str(exc))
    spec = getattr(hookspecs, match.group(1), None) if match else None
    function = getattr(exc.plugin, match.group(1), None) if match else None
    if not (match and callable(spec) and callable(function)):
        return f"invalid hook implementation: {text}"
    hook_name = match.group(1)
    written = ", ".join(inspect.signature(function).parameters)
    expected = ", ".join(inspect.signature(spec).parameters)
    unknown = sorted(set(inspect.signature(function).parameters) - set(inspect.signature(spec).parameters))
    reason = f"unknown argument(s) {', '.join(unknown)}" if unknown else text
    return f"wrong hook signature {hook_name}({written}); the hook is {hook_name}({expected}): {reason}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PluginError):
        return exc.message  # ours: it says what is wrong, the place is the plugin's name
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def load_plugins(plugins_dir: Path | None = None, *, extra: Iterable[tuple[object, str]] = ()) -> Plugins:
    """Load built-ins, entry points and a plugins directory, in that order; ``extra`` (object, name) last."""
    plugins = Plugins()
    plugins.load_builtins()
    plugins.load_entry_points()
    if plugins_dir is not None:
        plugins.load_directory(plugins_dir)
    for plugin, name in extra:
        plugins.add(plugin, PluginInfo(name=name, source="test"))
    # failures are in plugins.failures: each command reports them once, in its own format
    return plugins
