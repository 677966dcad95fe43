"""The JSON Schema of workflow files, including every installed step type's config.

Editors use it for completion and checks (``# yaml-language-server: $schema=...``):
``uses`` lists the installed step types, and ``with`` is checked against the chosen
type's own config model, with its field descriptions.
"""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from automator.spec.durations import format_duration
from automator.spec.models import WorkflowSpec

if TYPE_CHECKING:
    from automator.plugins.manager import Plugins

DECIMAL_TEXT_PATTERN = r"^[+-]?(\d+(\.\d*)?|\.\d+)$"
SCHEMA_ID = "https://automator.dev/schemas/workflow.schema.json"


class WorkflowSchemaGenerator(GenerateJsonSchema):
    """pydantic's generator, with defaults written as a workflow file writes them.

    pydantic renders a timedelta default in ISO 8601 (``PT30S``), which our duration
    type refuses; an editor would offer a default that ``automator validate`` rejects.
    """

    def encode_default(self, dft: Any) -> Any:
        return super().encode_default(_as_written(dft))

    def decimal_schema(self, schema: core_schema.DecimalSchema) -> JsonSchemaValue:
        # pydantic releases write a decimal's text form differently (2.14 dropped the
        # pattern 2.13 wrote): the shipped schema must not depend on which one is installed
        json_schema = super().decimal_schema(schema)
        for branch in json_schema.get("anyOf", [json_schema]):
            if branch.get("type") == "string":
                branch["pattern"] = DECIMAL_TEXT_PATTERN
        return json_schema


def _as_written(value: Any) -> Any:
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, dict):
        return {k: _as_written(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_written(v) for v in value]
    return value


def _lift_defs(schema: dict[str, Any], defs: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Move a sub-schema's $defs into the shared ones, renaming to avoid clashes."""
    schema = copy.deepcopy(schema)
    local = schema.pop("$defs", {})
    renames = {name: f"{prefix}.{name}" for name in local}

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                target = ref.removeprefix("#/$defs/")
                node = {**node, "$ref": f"#/$defs/{renames.get(target, target)}"}
            return {k: fix(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    for name, sub in local.items():
        defs[renames[name]] = fix(sub)
    return fix(schema)


def workflow_json_schema(plugins: Plugins) -> dict[str, Any]:
    schema = WorkflowSpec.model_json_schema(by_alias=True, schema_generator=WorkflowSchemaGenerator)
    defs: dict[str, Any] = schema.setdefault("$defs", {})
    step = defs["StepSpec"]
    names = sorted(plugins.step_types)
    step["properties"]["uses"] = {
        "type": "string",
        "enum": names,
        "description": step["properties"]["uses"].get("description", ""),
    }
    branches: list[dict[str, Any]] = []
    for name in names:
        step_type = plugins.step_types[name]
        config_schema = _lift_defs(
            step_type.Config.model_json_schema(by_alias=True, schema_generator=WorkflowSchemaGenerator), defs, name
        )
        config_schema.pop("title", None)
        description = step_type.description or (step_type.__doc__ or "").strip().splitlines()[0:1]
        if isinstance(description, list):
            description = description[0] if description else ""
        config_schema["description"] = f"{name} ({step_type.phase}): {description}".strip()
        defs[f"config.{name}"] = config_schema
        branches.append(
            {
                "if": {"properties": {"uses": {"const": name}}, "required": ["uses"]},
                "then": {"properties": {"with": {"$ref": f"#/$defs/config.{name}"}}},
            }
        )
    if branches:
        step["allOf"] = branches
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "automator workflow"
    return schema
