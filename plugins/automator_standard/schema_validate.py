"""schema.validate: check each item against a JSON Schema; skip, quarantine or fail the invalid."""

from __future__ import annotations

from typing import Any, Literal

import jsonschema
from jsonschema.exceptions import best_match
from pydantic import Field, field_validator

from automator import Item, QuarantineItem, SkipItem, StepConfig, StepError, ValidateStep, hookimpl


class SchemaValidateConfig(StepConfig):
    schema_: dict[str, Any] = Field(alias="schema", description="A JSON Schema (draft 2020-12) for each item.")
    on_invalid: Literal["skip", "quarantine", "fail"] = Field(
        "quarantine", description="skip: filter out; quarantine: keep aside with the reason; fail: the item fails."
    )

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            jsonschema.Draft202012Validator.check_schema(value)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(p) for p in exc.path) or "the top"
            raise ValueError(f"not a valid JSON Schema (at {where}): {exc.message}") from None
        return value


class SchemaValidate(ValidateStep[SchemaValidateConfig]):
    name = "schema.validate"
    description = "Validate items against a JSON Schema."

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._validator = jsonschema.Draft202012Validator(
            self.config.schema_, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )

    def validate(self, item: Item) -> None:
        if self._validator.is_valid(item.data):  # the common case; explaining costs more
            return
        error = best_match(self._validator.iter_errors(item.data))
        if error is None:
            return
        where = ".".join(str(p) for p in error.absolute_path)
        reason = f"{where}: {error.message}" if where else error.message
        if self.config.on_invalid == "skip":
            raise SkipItem(f"invalid: {reason}")
        if self.config.on_invalid == "quarantine":
            raise QuarantineItem(reason)
        raise StepError(f"invalid: {reason}", retryable=False)


@hookimpl
def register_step_types(register: Any) -> None:
    register(SchemaValidate)
