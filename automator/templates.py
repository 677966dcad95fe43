"""Jinja2 templates in a sandbox, strict about undefined names.

A string that is exactly one expression (``"{{ item.id }}"``) renders to the value
itself, not its text, so numbers, lists and objects keep their type; any other string
renders to text. Compiled templates are cached, since the same few strings are rendered
once per item.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, Undefined, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from automator.errors import TemplateRenderError

CONTEXT_NAMES = frozenset({"item", "steps", "run", "secrets", "params"})
_SINGLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>.*)\}\}\s*$", re.DOTALL)


def _tojson(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.filters["tojson"] = _tojson
    env.filters["json"] = _tojson
    return env


ENVIRONMENT = _make_environment()


def add_filters(filters: Mapping[str, Callable[..., Any]]) -> None:
    """Make plugin-provided filters available to every template."""
    ENVIRONMENT.filters.update(filters)
    _compile.cache_clear()


def add_globals(values: Mapping[str, Any]) -> None:
    ENVIRONMENT.globals.update(values)
    _compile.cache_clear()


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


_DOTTED = re.compile(r"^\s*\{\{\s*(?P<root>[A-Za-z_]\w*)(?P<rest>(?:\.[A-Za-z_]\w*)+)\s*\}\}\s*$")
_DICT_ATTRIBUTES = frozenset(dir(dict))


def _dotted_getter(root: str, parts: list[str], fallback: Callable[[Mapping[str, Any]], Any]) -> Callable[..., Any]:
    """``{{ item.a.b }}`` without Jinja's per-call context: the same value, much faster.

    Only plain dict lookups take the fast path; anything else (a missing key, an object,
    a name that is also a dict method) goes through Jinja for its exact semantics.
    """

    def get(context: Mapping[str, Any]) -> Any:
        value = context.get(root, _MISSING) if isinstance(context, dict) else _MISSING
        for part in parts:
            if type(value) is not dict or part not in value:
                return fallback(context)
            value = value[part]
        return fallback(context) if value is _MISSING else value

    return get


_MISSING = object()


@lru_cache(maxsize=4096)
def _compile(text: str) -> Callable[[Mapping[str, Any]], Any]:
    dotted = _DOTTED.match(text)
    if dotted:
        parts = dotted.group("rest").split(".")[1:]
        if not _DICT_ATTRIBUTES.intersection(parts) and dotted.group("root") in CONTEXT_NAMES:
            expression = ENVIRONMENT.compile_expression(text.strip()[2:-2], undefined_to_none=False)
            return _dotted_getter(dotted.group("root"), parts, lambda context: expression(**context))
    match = _SINGLE_EXPRESSION.match(text)
    if match and "}}" not in match.group("expr") and "{{" not in match.group("expr"):
        expression = ENVIRONMENT.compile_expression(match.group("expr"), undefined_to_none=False)
        return lambda context: expression(**context)
    template = ENVIRONMENT.from_string(text)
    return template.render


def render(text: str, context: Mapping[str, Any]) -> Any:
    """Render one template string; raises TemplateRenderError with the reason."""
    if not is_template(text):
        return text
    try:
        value = _compile(text)(context)
    except UndefinedError as exc:
        raise TemplateRenderError(f"template {_short(text)}: {exc.message}") from None
    except SecurityError as exc:
        raise TemplateRenderError(f"template {_short(text)}: not allowed: {exc}") from None
    except TemplateSyntaxError as exc:
        raise TemplateRenderError(f"template {_short(text)}: {exc.message}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise TemplateRenderError(f"template {_short(text)}: {type(exc).__name__}: {exc}") from None
    if isinstance(value, Undefined):
        # a lone expression hands back the Undefined itself instead of raising
        raise TemplateRenderError(f"template {_short(text)}: {value._undefined_message}")
    return value


def render_text(text: str, context: Mapping[str, Any]) -> str:
    value = render(text, context)
    return value if isinstance(value, str) else _tojson(value) if isinstance(value, dict | list) else str(value)


def render_value(value: Any, context: Mapping[str, Any]) -> Any:
    """Render every string inside a structure of dicts and lists."""
    if isinstance(value, str):
        return render(value, context)
    if isinstance(value, dict):
        return {k: render_value(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, context) for v in value]
    return value


def _short(text: str) -> str:
    one_line = " ".join(text.split())
    return repr(one_line if len(one_line) <= 60 else one_line[:57] + "...")


# --- load-time checks ---------------------------------------------------------------


class TemplateSyntaxProblemError(ValueError):
    def __init__(self, message: str, line: int = 1) -> None:
        super().__init__(message)
        self.line = line


def references(text: str) -> tuple[set[str], set[tuple[str, str]]]:
    """Parse a template: the top-level names it reads and its (``steps``|``params``, name) lookups.

    Raises TemplateSyntaxProblemError for a syntax error, with the line inside the template.
    """
    try:
        tree = ENVIRONMENT.parse(text)
    except TemplateSyntaxError as exc:
        raise TemplateSyntaxProblemError(f"template syntax error: {exc.message}", exc.lineno or 1) from None
    assigned = {n.name for n in tree.find_all(nodes.Name) if n.ctx in ("store", "param")}
    names = {n.name for n in tree.find_all(nodes.Name) if n.ctx == "load"} - assigned
    lookups: set[tuple[str, str]] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(node.node, nodes.Name) and node.node.name in ("steps", "params"):
            if isinstance(node, nodes.Getattr):
                lookups.add((node.node.name, node.attr))
            elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                lookups.add((node.node.name, node.arg.value))
    return names, lookups


def unknown_filters(text: str) -> set[str]:
    """Filters and tests a (parseable) template uses that no plugin has registered."""
    tree = ENVIRONMENT.parse(text)
    filters = {n.name for n in tree.find_all(nodes.Filter)} - set(ENVIRONMENT.filters)
    tests = {n.name for n in tree.find_all(nodes.Test)} - set(ENVIRONMENT.tests)
    return filters | tests


def iter_strings(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[tuple[str | int, ...], str]]:
    """Every string in a structure, with its path, for checking templates at load time."""
    found: list[tuple[tuple[str | int, ...], str]] = []
    if isinstance(value, str):
        found.append((path, value))
    elif isinstance(value, dict):
        for k, v in value.items():
            found.extend(iter_strings(v, (*path, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found.extend(iter_strings(v, (*path, i)))
    return found
