"""Loading a workflow file: YAML → checked models → a Workflow ready to run.

Every problem in a file is collected and reported at once, each at its line and
column, so that ``automator validate`` in CI tells the whole story in one go.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from automator import templates
from automator.errors import Problem, WorkflowFileError
from automator.plugins.steps import Phase, StepConfig, StepType
from automator.spec.models import StepSpec, WorkflowSpec
from automator.spec.yamlpos import Located, YamlSyntaxError, load_located
from automator.spec.yamlpos import Path as YamlPath

if typing.TYPE_CHECKING:
    from automator.plugins.manager import Plugins

WORKFLOW_SUFFIXES = (".yaml", ".yml")
# what a group (digest) step's with: templates see besides the usual names
GROUP_NAMES = frozenset({"items", "group"})
MAX_MESSAGE = 300  # a message quotes what was written; a 1 MB value must not become a 1 MB line

log = logging.getLogger("automator.workflows")


@dataclass
class BoundStep:
    """A step of a loaded workflow: its spec, its step type and its checked config."""

    spec: StepSpec
    type: StepType
    config: StepConfig
    plugin: str

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def phase(self) -> Phase:
        return self.type.phase

    @property
    def only_new(self) -> bool:
        """A fetch step passes only items whose key no run delivered (the default with a key)."""
        return self.spec.only_new if self.spec.only_new is not None else self.spec.key is not None


@dataclass
class Workflow:
    """A workflow file that passed every check."""

    name: str
    path: Path
    text: str
    spec: WorkflowSpec
    steps: list[BoundStep]
    on_failure: list[BoundStep] = field(default_factory=list)

    @property
    def version(self) -> str:
        """A hash of the file's content; each run records the version it ran."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


class _Checker:
    def __init__(self, filename: str, located: Located, text: str = "") -> None:
        self.filename = filename
        self.located = located
        self.lines = text.splitlines()
        self.problems: list[Problem] = []

    def at_value(self, path: YamlPath, message: str, line_offset: int = 0) -> None:
        pos = self.located.value_at(path)
        self.problems.append(Problem(self.filename, pos.line + line_offset, pos.column, _shorten(message)))

    def at_template_line(self, path: YamlPath, line: int, message: str) -> None:
        """At ``line`` (1-based) of the template at ``path``: in a block scalar, at that line's text."""
        if path not in self.located.block_scalars:
            self.at_value(path, message, line_offset=line - 1)
            return
        pos = self.located.value_at(path)  # the | or > that opens the block
        number = pos.line + line
        text = self.lines[number - 1] if 0 < number <= len(self.lines) else ""
        column = len(text) - len(text.lstrip(" ")) + 1 if text.strip() else pos.column
        self.problems.append(Problem(self.filename, number, column, _shorten(message)))

    def at_key(self, path: YamlPath, message: str) -> None:
        pos = self.located.key_at(path)
        self.problems.append(Problem(self.filename, pos.line, pos.column, _shorten(message)))

    def pydantic_errors(self, error: ValidationError, model: type[BaseModel], prefix: YamlPath = ()) -> None:
        for item in error.errors(include_url=False):
            loc = tuple(item["loc"])
            path = _resolve(self.located.data, prefix, loc)
            kind = item["type"]
            message = str(item["msg"]).removeprefix("Value error, ")
            model_path = path[len(prefix) :]
            if kind == "extra_forbidden":
                key = str(path[-1])
                allowed = _allowed_keys(model, model_path[:-1])
                suggestion = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"; did you mean {suggestion[0]!r}?" if suggestion else ""
                known = f" (allowed here: {', '.join(sorted(allowed))})" if allowed and not hint else ""
                self.at_key(path, f"unknown key {key!r}{hint}{known}")
            elif kind == "missing":
                parent = path if path and path[-1] != loc[-1] else path[:-1]
                # name the absent keys in between too: "with.path" when there is no with: at all
                intended = (*prefix, *loc)
                absent = [str(p) for p in intended[len(parent) :] if not isinstance(p, int)]
                self.at_value(parent, f"missing required key {'.'.join(absent)!r}")
            else:
                key = None
                if _allowed_keys(model, model_path):  # an error of a whole model: its model validator's
                    key = _key_named(item, message, _at_path(self.located.data, path))
                if key is not None:  # a model validator's error about one of its keys
                    path = (*path, key)
                where = ".".join(str(p) for p in path[len(prefix) :]) or (str(prefix[-1]) if prefix else "value")
                if key is not None or (not loc and isinstance(_at_path(self.located.data, path), dict)):
                    # a step's whole config is wrong: show its key (`with:`), not its first entry
                    self.at_key(path, f"{where}: {message}")
                else:
                    self.at_value(path, f"{where}: {message}")


def _shorten(message: str) -> str:
    message = " ".join(message.split())  # one problem, one line
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


_ABSENT = object()


def _child(data: Any, part: str | int) -> Any:
    """``data[part]`` if the file has it there, else _ABSENT."""
    if isinstance(data, dict):
        return data.get(part, _ABSENT)
    if isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
        return data[part]
    return _ABSENT


def _at_path(data: Any, path: YamlPath) -> Any:
    for part in path:
        data = _child(data, part)
        if data is _ABSENT:
            break
    return data


def _key_named(item: Any, message: str, mapping: Any) -> str | None:
    """The key of ``mapping`` that an error about the whole mapping names, if any.

    A model validator's error has no location of its own: it may name a key in its
    context (``PydanticCustomError(..., {"field": "port"})``), or mention keys in its
    message; the key it names first is where the problem is shown.
    """
    if not isinstance(mapping, dict) or not mapping:
        return None
    ctx = item.get("ctx") or {}
    named = ctx.get("field")
    if isinstance(named, str) and named in mapping:
        return named
    for pattern in (r"[`'\"]{key}[`'\"]|\b{key}\s*:", r"(?<![\w.-]){key}(?![\w-])"):
        mentions = {}
        for key in mapping:
            found = re.search(pattern.format(key=re.escape(key)), message) if isinstance(key, str) else None
            if found is not None:
                mentions[key] = found.start()
        if mentions:
            return min(mentions, key=mentions.__getitem__)  # the key the message names first
    return None


def _resolve(data: Any, prefix: YamlPath, loc: tuple[Any, ...]) -> YamlPath:
    """Map a pydantic error location onto the YAML path, dropping union tags."""
    path: list[str | int] = []
    current = data
    for part in prefix:
        current = _child(current, part)
        if current is _ABSENT:
            return tuple(path)  # the section itself is absent (no `with:`): report at its parent
        path.append(part)
    for i, part in enumerate(loc):
        if (isinstance(current, dict) and part in current) or (
            isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current)
        ):
            path.append(part)
            current = current[part]
        elif i == len(loc) - 1 and isinstance(part, str) and isinstance(current, dict):
            path.append(part)  # a missing or unknown key: keep it for the message
    return tuple(path)


def _unwrap(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (list, tuple, set, dict):
        args = typing.get_args(annotation)
        return _unwrap(args[-1]) if args else []
    return [annotation]


def _allowed_keys(model: type[BaseModel], path: YamlPath) -> list[str]:
    """The keys a mapping at ``path`` (relative to ``model``) may have."""
    candidates: list[Any] = [model]
    for part in path:
        if isinstance(part, int):
            continue
        following: list[Any] = []
        for cand in candidates:
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                for name, info in cand.model_fields.items():
                    if part in (name, info.alias):
                        following.extend(_unwrap(info.annotation))
        candidates = following
    keys: list[str] = []
    for cand in candidates:
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            keys.extend(info.alias or name for name, info in cand.model_fields.items())
    return keys


# A workflow file is a page or two of YAML; PyYAML reads about 1 MB a second, so a file
# this large is a mistake (a log or a data file saved as .yaml), not a workflow.
MAX_FILE_BYTES = 1024 * 1024


def read_workflow_text(path: Path) -> str:
    """A workflow file's text; raises WorkflowFileError (at the bad byte, where there is one)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise WorkflowFileError([Problem(str(path), 1, 1, f"cannot read the file: {exc.strerror or exc}")]) from None
    if len(data) > MAX_FILE_BYTES:
        message = f"the file is larger than {MAX_FILE_BYTES // 1024} KB: is it really a workflow file?"
        raise WorkflowFileError([Problem(str(path), 1, 1, message)])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1 :].decode("utf-8", errors="replace")) + 1
        message = f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} here); save it as UTF-8"
        raise WorkflowFileError([Problem(str(path), line, column, message)]) from None


def load_workflow(path: Path | str, plugins: Plugins) -> Workflow:
    """Read and check a workflow file; raises WorkflowFileError listing every problem."""
    path = Path(path)
    return load_workflow_text(read_workflow_text(path), path, plugins)


def load_workflow_text(text: str, path: Path, plugins: Plugins) -> Workflow:
    filename = str(path)
    try:
        located = load_located(text)
    except YamlSyntaxError as exc:
        pos = exc.position
        raise WorkflowFileError([Problem(filename, pos.line, pos.column, _shorten(str(exc)))]) from None
    check = _Checker(filename, located, text)
    data = located.data
    if data is None:
        check.at_value((), "the file is empty: a workflow needs at least `steps:` (see `automator schema`)")
        raise WorkflowFileError(check.problems)
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        check.at_value((), f"a workflow file must be a mapping of keys (name, steps, ...), not {kind}")
        raise WorkflowFileError(check.problems)
    for dup_path, pos in located.duplicate_keys:
        check.problems.append(
            Problem(filename, pos.line, pos.column, f"duplicate key {dup_path[-1]!r}: the later one would win")
        )

    spec: WorkflowSpec | None = None
    try:
        spec = WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        check.pydantic_errors(exc, WorkflowSpec)

    steps = _bind_steps(check, data, "steps", plugins)
    on_failure = _bind_steps(check, data, "on_failure", plugins)
    _check_structure(check, data, steps, on_failure)
    _check_step_keys(check, data, plugins)
    _check_templates(check, data, plugins)

    if check.problems or spec is None:
        raise WorkflowFileError(check.problems)
    workflow = Workflow(
        name=spec.name or path.stem,
        path=path,
        text=text,
        spec=spec,
        steps=[s for s in steps if s is not None],
        on_failure=[s for s in on_failure if s is not None],
    )
    for where, message in plugins.workflow_loaded(workflow):  # policies from plugins
        check.at_value(where, message)
    if check.problems:
        raise WorkflowFileError(check.problems)
    return workflow


def _bind_steps(check: _Checker, data: dict[str, Any], section: str, plugins: Plugins) -> list[BoundStep | None]:
    raw_steps = data.get(section)
    if not isinstance(raw_steps, list):
        return []
    bound: list[BoundStep | None] = []
    for i, raw in enumerate(raw_steps):
        bound.append(None)
        if not isinstance(raw, dict) or not isinstance(raw.get("uses"), str):
            continue
        uses = raw["uses"]
        step_type = plugins.step_type(uses)
        if step_type is None:
            installed = sorted(plugins.step_types)
            close = difflib.get_close_matches(uses, installed, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            check.at_value(
                (section, i, "uses"),
                f"unknown step type {uses!r}; {hint}installed: {', '.join(installed) or 'none'} "
                "(see `automator plugins`)",
            )
            continue
        config_data = raw.get("with", {})
        if config_data is None:
            config_data = {}
        if not isinstance(config_data, dict):
            check.at_value((section, i, "with"), "with: must be a mapping of the step's settings")
            continue
        try:
            config = step_type.Config.model_validate(config_data)
        except ValidationError as exc:
            check.pydantic_errors(exc, step_type.Config, (section, i, "with"))
            continue
        except Exception as exc:  # a plugin's validator may raise anything
            # pydantic turns only ValueError and AssertionError into validation errors; anything
            # else is a bug in the plugin, reported against this step instead of ending the load
            log.warning("%s: the config check of %s raised", check.filename, uses, exc_info=exc)
            check.at_key(
                (section, i, "with"),
                f"the config check of step type {uses!r} failed: {type(exc).__name__}: {exc} "
                f"(a bug in plugin {plugins.step_plugin.get(uses, '?')})",
            )
            continue
        try:
            spec = StepSpec.model_validate(raw)
        except ValidationError:
            continue  # already reported by the whole-file check
        bound[i] = BoundStep(spec=spec, type=step_type, config=config, plugin=plugins.step_plugin[uses])
    return bound


def _check_structure(
    check: _Checker, data: dict[str, Any], steps: list[BoundStep | None], on_failure: list[BoundStep | None]
) -> None:
    seen: dict[str, int] = {}
    for section in ("steps", "on_failure"):
        raw_steps = data.get(section)
        if not isinstance(raw_steps, list):
            continue
        for i, raw in enumerate(raw_steps):
            if isinstance(raw, dict) and isinstance(raw.get("id"), str):
                step_id = raw["id"]
                if step_id in seen:
                    check.at_value((section, i, "id"), f"duplicate step id {step_id!r}: step ids must be unique")
                seen[step_id] = i
    after_fetch = False
    for i, step in enumerate(steps):
        if step is None:
            continue
        if step.phase is Phase.FETCH:
            if after_fetch:
                check.at_value(("steps", i, "uses"), "fetch steps must come before all other steps")
        else:
            after_fetch = True
            if i == 0:
                check.at_value(("steps", 0, "uses"), "the first step must be a fetch step (it produces the items)")
    for i, step in enumerate(on_failure):
        if step is not None and step.phase is not Phase.DELIVER:
            check.at_value(
                ("on_failure", i, "uses"),
                f"on_failure steps must be deliver steps; {step.type.name!r} is a {step.phase} step",
            )


def _phase(raw: dict[str, Any], plugins: Plugins) -> Phase | None:
    """A step's phase, from its step type (None when the type is unknown)."""
    step_type = plugins.step_type(raw["uses"]) if isinstance(raw.get("uses"), str) else None
    return step_type.phase if step_type is not None else None


def _check_step_keys(check: _Checker, data: dict[str, Any], plugins: Plugins) -> None:
    """Step keys that only some phases understand: key, only_new, when, group.

    The phase comes from the step type, not the bound step, so that a step whose
    ``with:`` or ``group:`` is also wrong still gets these problems reported.
    """
    for section in ("steps", "on_failure"):
        raw_steps = data.get(section)
        if not isinstance(raw_steps, list):
            continue
        for i, raw in enumerate(raw_steps):
            if not isinstance(raw, dict):
                continue
            phase = _phase(raw, plugins)
            given = {name for name in ("key", "only_new", "when", "group") if raw.get(name) is not None}
            if section == "on_failure":
                # an on_failure step gets one notice of the failed run, not the run's items
                for name in sorted(given & {"when", "group"}):
                    check.at_key(
                        (section, i, name),
                        f"{name}: is not allowed in on_failure steps: they get one notice of the failed run, "
                        "not the run's items",
                    )
                given -= {"when", "group"}
            if phase is None:
                continue
            if "key" in given and phase not in (Phase.FETCH, Phase.TRANSFORM):
                check.at_key(
                    (section, i, "key"),
                    f"key: is only allowed on fetch and transform steps (it names the items they make); "
                    f"remove it from this {phase} step",
                )
            if "only_new" in given and phase is not Phase.FETCH:
                check.at_key(
                    (section, i, "only_new"),
                    f"only_new: is only allowed on fetch steps; remove it from this {phase} step",
                )
            if "when" in given and phase is Phase.FETCH:
                check.at_key(
                    (section, i, "when"),
                    "when: is not allowed on fetch steps: a fetch step has no items yet; put it on a later step",
                )
            if "group" in given and phase is not Phase.DELIVER:
                check.at_key(
                    (section, i, "group"),
                    f"group: is only allowed on deliver steps (a digest: one delivery for many items); "
                    f"remove it from this {phase} step",
                )


def _dotted(path: YamlPath) -> str:
    return ".".join(str(part) for part in path)


def _check_templates(check: _Checker, data: dict[str, Any], plugins: Plugins) -> None:
    """Templates checked against the filters and globals of the plugins the file is loaded with."""
    environment = plugins.templates
    declared_params = set(data.get("params") or {}) if isinstance(data.get("params"), dict) else set()
    for section in ("steps", "on_failure"):
        raw_steps = data.get(section)
        if not isinstance(raw_steps, list):
            continue
        earlier: list[str] = []
        all_ids = [s.get("id") for s in raw_steps if isinstance(s, dict)]
        for i, raw in enumerate(raw_steps):
            if not isinstance(raw, dict):
                continue
            # each template with the names it may read: a group step's with: sees its group too
            # (group: on a step that cannot have it is reported apart; its with: is checked as any other's)
            in_group = raw.get("group") is not None and section == "steps" and _phase(raw, plugins) is Phase.DELIVER
            item_names = environment.known_names - GROUP_NAMES
            with_names = environment.known_names if in_group else item_names
            strings: list[tuple[YamlPath, str, frozenset[str]]] = [
                (path, text, with_names) for path, text in templates.iter_strings(raw.get("with"), (section, i, "with"))
            ]
            if isinstance(raw.get("key"), str):
                strings.append(((section, i, "key"), raw["key"], item_names))
            group = raw.get("group")
            by = group.get("by") if isinstance(group, dict) else None
            per_item: list[tuple[YamlPath, Any, str]] = [
                ((section, i, "when"), raw.get("when"), "{{ item.urgent }}"),
                ((section, i, "group", "by"), by, "{{ item.team }}"),
            ]
            for path, text, example in per_item:
                if not isinstance(text, str):
                    continue  # absent, or not text: the model check reports it
                if not templates.is_template(text):
                    # a constant would pass every item (or put all in one group): surely a missing {{ }}
                    bare = text.strip()
                    if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", bare):
                        named = bare if bare.split(".")[0] in environment.known_names else f"item.{bare}"
                        example = f"{{{{ {named} }}}}"
                    check.at_value(path, f'{_dotted(path[2:])}: must be a template such as "{example}"')
                    continue
                strings.append((path, text, item_names))
            for path, text, known_names in strings:
                if not templates.is_template(text):
                    continue
                try:
                    names, lookups = environment.references(text)
                    unknown_filters = environment.unknown_filters(text)
                except templates.TemplateSyntaxProblemError as exc:
                    check.at_template_line(path, exc.line, str(exc))
                    continue
                except RecursionError:
                    # Jinja's parser and visitors recurse once per level of (, [, { and block tags
                    check.at_value(path, "the template is nested too deeply to read; split it up")
                    continue
                for name in sorted(unknown_filters):
                    check.at_value(
                        path, f"unknown filter {name!r} in template (is the plugin that provides it installed?)"
                    )
                for name in sorted(names - known_names):
                    if name in GROUP_NAMES and in_group:
                        hint = f"`{name}` is known only in the step's with: ({_dotted(path[2:])}: sees one item)"
                    elif name in GROUP_NAMES:
                        hint = f"`{name}` is known only in a step with group:"
                    else:
                        hint = f"use one of {', '.join(sorted(templates.CONTEXT_NAMES & known_names))}"
                    check.at_value(path, f"unknown name {name!r} in template; {hint}")
                for kind, name in sorted(lookups):
                    if kind == "params" and name not in declared_params:
                        check.at_value(path, f"params.{name} is not declared; add it under `params:` with a default")
                    elif kind == "steps" and section == "steps" and name not in earlier:
                        where = "a later step" if name in all_ids else "no step"
                        check.at_value(path, f"steps.{name} refers to {where}; a template can read earlier steps only")
            if isinstance(raw.get("id"), str):
                earlier.append(raw["id"])
