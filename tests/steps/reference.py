"""The settings tables of docs/steps/<type>.md, from the standard step types' config models.

``python -m tests.steps.reference`` rewrites the table between the markers of each page
(the prose around it is written by hand); tests/steps/test_reference_pages.py fails when
a page misses a setting or documents a default other than the model's.
"""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from automator.plugins.manager import Plugins
from automator.plugins.steps import StepType

DOCS = Path(__file__).resolve().parents[2] / "docs" / "steps"
BEGIN = "<!-- settings: generated from the config model by `python -m tests.steps.reference` -->"
END = "<!-- end of settings -->"
REQUIRED = "required"


def standard_step_types() -> dict[str, StepType]:
    """Every step type of the built-in plugins, as they register themselves."""
    plugins = Plugins()
    plugins.load_builtins()
    assert not plugins.failures, plugins.failures
    return dict(sorted(plugins.step_types.items()))


def page(step_type: str) -> Path:
    return DOCS / f"{step_type}.md"


def default_text(info: FieldInfo) -> str:
    """A field's default as a workflow file would write it."""
    if info.is_required():
        return REQUIRED
    value = info.get_default(call_default_factory=True)
    return value_text(value)


def value_text(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, timedelta):
        seconds = int(value.total_seconds())
        for unit, size in (("h", 3600), ("m", 60)):
            if seconds and seconds % size == 0:
                return f"{seconds // size}{unit}"
        return f"{seconds}s"
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        shown = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(shown) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if annotation is typing.Any:
        return "any"
    if annotation is timedelta:
        return "duration"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    names = {str: "text", int: "integer", float: "number", bool: "boolean", Decimal: "number"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def setting_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(setting, type, default, description) for every field, nested models' fields dotted after."""
    rows: list[tuple[str, str, str, str]] = []
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, info in model.model_fields.items():
        key = prefix + (info.alias or name)
        description = (info.description or "").replace("|", "\\|")
        rows.append((key, type_text(info.annotation), default_text(info), description))
        for sub in _models_in(info.annotation):
            many = typing.get_origin(info.annotation) is list
            nested.append((f"{key}[]." if many else f"{key}.", sub))
    for sub_prefix, sub in nested:
        rows.extend(setting_rows(sub, sub_prefix))
    return rows


def table(model: type[BaseModel], written: dict[str, list[str]] | None = None) -> str:
    """The settings table; a description written on the page (``written``) is kept over the model's."""
    lines = ["| setting | type | default | description |", "|---|---|---|---|"]
    for key, kind, default, description in setting_rows(model):
        if written and key in written and written[key][3]:
            description = written[key][3]
        escaped = default.replace("|", "\\|")
        shown = default if default in (REQUIRED, "see below") else f"`{escaped}`"
        lines.append(f"| `{key}` | {kind} | {shown} | {description} |")
    return "\n".join(lines)


def table_rows(step_type: str) -> dict[str, list[str]]:
    """setting -> its row's cells as written on the page."""
    text = page(step_type).read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        return {}
    rows: dict[str, list[str]] = {}
    for line in text.split(BEGIN, 1)[1].split(END, 1)[0].splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def documented(step_type: str) -> dict[str, str]:
    """setting -> its default as the page shows it (markup removed)."""
    return {key: cells[2].strip("`").replace("\\|", "|") for key, cells in table_rows(step_type).items()}


def refresh(step_type: str, model: type[BaseModel]) -> None:
    path = page(step_type)
    text = path.read_text(encoding="utf-8")
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    path.write_text(f"{before}{BEGIN}\n{table(model, table_rows(step_type))}\n{END}{after}", encoding="utf-8")


if __name__ == "__main__":
    for name, step in standard_step_types().items():
        if page(name).exists():
            refresh(name, step.Config)
        else:
            print(f"{page(name)} is missing: write it, with the two markers where the table goes", file=sys.stderr)
