"""Output schemas: the compact field map of workflow files, and OpenAI's strict subset.

A workflow gives ``output.schema`` either as a full JSON Schema (an object schema) or
as a compact field map::

    category: {enum: [billing, bug, how-to, other]}   # a property's JSON Schema
    urgency: {type: integer, minimum: 1, maximum: 5}
    tags: [urgent, vip]                               # a list is an enum
    summary: string                                   # a type name
    order_id: string?                                 # ? = optional (may be null)

Structured outputs accept a subset of JSON Schema: every property required (optional
ones become a union with null), ``additionalProperties: false`` everywhere, an object at
the root, no allOf/not/if-then-else. ``OutputSchema.sent`` is that subset; ``validation``
keeps every constraint the workflow wrote (minLength, say), so the answer is checked
again on return and a violation is fed back to the model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

TYPE_NAMES = {"string", "integer", "number", "boolean", "object", "array", "null"}
FORBIDDEN = ("allOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "oneOf")
# keywords structured outputs accept; others are kept for local validation only
SENT_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf",
    "$ref", "$defs", "definitions", "description", "title",
    "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "minItems", "maxItems",
}  # fmt: skip


class SchemaProblem(ValueError):  # noqa: N818 - a problem in a workflow file
    """The output schema cannot be used; the message says where and why."""


@dataclass(frozen=True)
class OutputSchema:
    name: str
    validation: dict[str, Any]  # strict shape, every constraint kept
    sent: dict[str, Any]  # what response_format carries

    def errors(self, value: Any) -> list[str]:
        """What is wrong with a parsed answer, each as `path: message` (empty when valid)."""
        validator = Draft202012Validator(self.validation)
        found = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        return [f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in found[:10]]


def is_full_schema(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "object" or "properties" in schema or "$schema" in schema


def _from_compact_value(field: str, value: Any) -> tuple[dict[str, Any], bool]:
    """A compact field's JSON Schema, and whether the field is optional."""
    if isinstance(value, str):
        optional = value.endswith("?")
        name = value.removesuffix("?")
        if name not in TYPE_NAMES:
            raise SchemaProblem(
                f"field {field!r}: unknown type {value!r} (use one of {', '.join(sorted(TYPE_NAMES))}, "
                "optionally with ? for optional)"
            )
        return ({"type": name}, optional)
    if isinstance(value, list):
        if not value:
            raise SchemaProblem(f"field {field!r}: an enum needs at least one value")
        return (_with_enum_type({"enum": list(value)}), False)
    if isinstance(value, dict):
        prop = dict(value)
        optional = bool(prop.pop("optional", False))
        if "enum" in prop and "type" not in prop:
            prop = _with_enum_type(prop)
        if not any(k in prop for k in ("type", "enum", "const", "anyOf", "$ref", "properties", "items")):
            raise SchemaProblem(f"field {field!r}: give a type, an enum or a JSON Schema")
        if "properties" in prop and "type" not in prop:
            prop["type"] = "object"
        return (prop, optional)
    raise SchemaProblem(f"field {field!r}: expected a type name, a list of values, or a JSON Schema mapping")


def _with_enum_type(prop: dict[str, Any]) -> dict[str, Any]:
    kinds = {type(v) for v in prop["enum"]}
    if kinds <= {str}:
        prop["type"] = "string"
    elif kinds <= {int}:
        prop["type"] = "integer"
    elif kinds <= {int, float}:
        prop["type"] = "number"
    return prop


def from_compact(fields: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field, value in fields.items():
        prop, optional = _from_compact_value(str(field), value)
        properties[str(field)] = prop
        if not optional:
            required.append(str(field))
    return {"type": "object", "properties": properties, "required": required}


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    prop = dict(prop)
    kind = prop.get("type")
    if isinstance(kind, str):
        prop["type"] = [kind, "null"] if kind != "null" else "null"
    elif isinstance(kind, list):
        prop["type"] = kind if "null" in kind else [*kind, "null"]
    elif "anyOf" in prop:
        prop["anyOf"] = [*prop["anyOf"], {"type": "null"}]
    else:
        return {"anyOf": [prop, {"type": "null"}]}
    if "enum" in prop and None not in prop["enum"]:
        prop["enum"] = [*prop["enum"], None]
    return prop


def _strict(node: Any, where: str) -> Any:
    if isinstance(node, list):
        return [_strict(n, where) for n in node]
    if not isinstance(node, dict):
        return node
    for keyword in FORBIDDEN:
        if keyword in node:
            raise SchemaProblem(f"{where}: {keyword} is not supported by structured outputs (use anyOf or enum)")
    out = {k: _strict(v, f"{where}/{k}") for k, v in node.items() if k not in ("properties", "required")}
    if "properties" in node or node.get("type") == "object":
        props = node.get("properties") or {}
        if not props:
            raise SchemaProblem(f"{where}: an object needs at least one property (structured outputs)")
        required = set(node.get("required", []))
        out["properties"] = {
            name: _strict(prop if name in required else _nullable(prop), f"{where}/{name}")
            for name, prop in props.items()
        }
        out["required"] = list(props)
        out["additionalProperties"] = False
        out.setdefault("type", "object")
    return out


def _sent(node: Any) -> Any:
    if isinstance(node, list):
        return [_sent(n) for n in node]
    if not isinstance(node, dict):
        return node
    kept: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "$defs", "definitions"):
            kept[key] = {name: _sent(sub) for name, sub in value.items()}
        elif key in SENT_KEYWORDS:
            kept[key] = _sent(value)
    return kept


def build(schema: dict[str, Any], name: str = "result") -> OutputSchema:
    """Check a workflow's output schema and derive the strict one; raises SchemaProblem."""
    source = copy.deepcopy(schema) if is_full_schema(schema) else from_compact(schema)
    source.pop("$schema", None)
    if source.get("type", "object") != "object":
        raise SchemaProblem("the root of an output schema must be an object (wrap a list in a property)")
    try:
        Draft202012Validator.check_schema(source)
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise SchemaProblem(f"invalid JSON Schema at {path}: {exc.message}") from None
    validation = _strict(source, "schema")
    return OutputSchema(name=name, validation=validation, sent=_sent(validation))
