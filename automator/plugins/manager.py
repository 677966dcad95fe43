"""Finding, loading and calling plugins: a typed facade over pluggy.

Core code calls ``plugins.run_started(event)`` and friends, never ``pm.hook.x``
untyped. A plugin that fails to import, register or declare itself is recorded in
``failures`` and skipped; it never stops the others from loading.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from automator import templates
from automator.errors import PluginError
from automator.plugins import hookspecs
from automator.plugins.events import ItemOutcome, RunFinished, RunStarted, StepFinished, StepStarted
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
)


@dataclass
class PluginInfo:
    name: str
    source: str  # built-in | entry point | directory
    version: str | None = None
    location: str | None = None
    hooks: list[str] = field(default_factory=list)
    steps: list[StepType] = field(default_factory=list)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "location": self.location,
            "hooks": self.hooks,
            "steps": [{"name": s.name, "phase": str(s.phase)} for s in self.steps],
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
        try:
            self.pm.register(plugin, name=info.name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            info.error = f"invalid hook implementation: {exc}"
            return False
        unknown = [hc.name for hc in self.pm.get_hookcallers(plugin) or [] if not hc.has_spec()]
        if unknown:
            self.pm.unregister(plugin)
            info.error = (
                f"implements unknown hook(s) {', '.join(sorted(unknown))}; see docs/plugins.md for the hook names"
            )
            return False
        info.hooks = sorted(hc.name for hc in self.pm.get_hookcallers(plugin) or [])
        return self._register_steps(plugin, info)

    def _register_steps(self, plugin: object, info: PluginInfo) -> bool:
        impls = [i for i in self.pm.hook.register_step_types.get_hookimpls() if i.plugin is plugin]
        found: list[StepType] = []
        try:
            for impl in impls:
                impl.function(register=found.append)
            for step_type in found:
                _check_step_type(step_type)
                if step_type.name in self.step_types:
                    raise PluginError(
                        f"step type {step_type.name!r} is already registered by plugin "
                        f"{self.step_plugin[step_type.name]!r}"
                    )
        except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, never fatal
            info.error = _describe(exc)
            self.pm.unregister(plugin)
            return False
        for step_type in found:
            self.step_types[step_type.name] = step_type
            self.step_plugin[step_type.name] = info.name
        info.steps = found
        filters: dict[str, Callable[..., Any]] = {}
        for impl in self.pm.hook.register_template_filters.get_hookimpls():
            if impl.plugin is plugin:
                impl.function(register=filters.__setitem__)
        templates.add_filters(filters)
        return True

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

    def workflow_loaded(self, workflow: Any) -> list[str]:
        problems: list[str] = []
        for result in self.pm.hook.workflow_loaded(workflow=workflow):
            problems.extend(result or [])
        return problems

    def get_secret(self, name: str) -> str | None:
        result = self.pm.hook.get_secret(name=name)
        return None if result is None else str(result)

    def register_commands(self, cli: Any) -> None:
        self.pm.hook.register_commands(cli=cli)

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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def load_plugins(plugins_dir: Path | None = None, *, extra: Iterable[tuple[object, str]] = ()) -> Plugins:
    """Load built-ins, entry points and a plugins directory, in that order."""
    plugins = Plugins()
    plugins.load_builtins()
    plugins.load_entry_points()
    if plugins_dir is not None:
        plugins.load_directory(plugins_dir)
    for plugin, name in extra:
        plugins.add(plugin, PluginInfo(name=name, source="test"))
    for failure in plugins.failures:
        log.warning("plugin %s failed to load and is skipped: %s", failure.name, failure.error)
    return plugins
