"""The workflow file format, as pydantic models (see docs/workflows.md).

These models check everything that does not depend on installed plugins; each step's
``with:`` block is checked afterwards against its step type's own config model.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from automator.spec.cron import check_cron
from automator.spec.durations import Duration

STEP_ID_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]*$"
WORKFLOW_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SpecModel(BaseModel):
    # validate_default: a default is checked (and parsed) like a value written in the file,
    # so a default can never be of a type the code does not expect
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


class RetryPolicy(SpecModel):
    """How often a step is tried, and how long to wait between tries."""

    attempts: int = Field(3, ge=1, le=100, description="Tries in all, the first included.")
    backoff: Duration = Field(timedelta(seconds=1), description="Wait before the second try; doubles after each.")
    max_backoff: Duration = Field(timedelta(minutes=1), description="The longest wait between two tries.")


class Schedule(SpecModel):
    """When the daemon runs the workflow: exactly one of cron, every, at."""

    cron: str | None = Field(None, description="Standard 5-field cron: minute hour day-of-month month day-of-week.")
    every: Duration | None = Field(None, description="An interval, such as 15m.")
    at: datetime | None = Field(None, description="Once, at this local date and time.")
    timezone: str = Field("UTC", description="IANA time zone, such as Europe/Berlin.")
    catch_up: Literal["none", "latest", "all"] = Field(
        "latest", description="What to do with fires missed while the daemon was down."
    )
    jitter: Duration | None = Field(None, description="Delay each fire by up to this much.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}: use an IANA name such as Europe/Berlin or UTC") from None
        return value

    @field_validator("every")
    @classmethod
    def _every(cls, value: Any) -> Any:
        if value is not None and value.total_seconds() < 1:
            raise ValueError("an interval must be at least 1s")
        return value

    @field_validator("at")
    @classmethod
    def _at(cls, value: datetime | None) -> datetime | None:
        # the scheduler works in UTC timestamps: a time near year 1 or 9999 overflows there
        if value is not None and not 1970 <= value.year <= 9998:
            raise ValueError(f"the time {value.isoformat()} is out of range: use a year from 1970 to 9998")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Schedule:
        given = [name for name in ("cron", "every", "at") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "a schedule needs exactly one of cron, every or at" + (f" (found {', '.join(given)})" if given else "")
            )
        return self


class Budget(SpecModel):
    """Spending limits for the workflow's model calls, in USD; a run stops before it would pass one."""

    max_cost_usd: Decimal | None = Field(None, gt=0, description="The most one run may spend on model calls.")
    max_cost_usd_per_day: Decimal | None = Field(
        None, gt=0, description="The most all runs of the workflow may spend per UTC day."
    )


class StepDefaults(SpecModel):
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout: Duration | None = Field(None, description="Per step attempt (per item for item steps).")


class Group(SpecModel):
    """A deliver step's items in groups (a digest): one delivery for many items."""

    size: int = Field(100, ge=1, le=10_000, description="The most items in one group (one delivery).")
    by: str | None = Field(
        None, description='A template: items with the same value go in the same groups, such as "{{ item.team }}".'
    )


class StepSpec(SpecModel):
    """One step of a workflow: a step type (``uses``) and its config (``with``)."""

    id: str = Field(
        description="Unique within the workflow: a letter, then letters, digits, - or _.",
        json_schema_extra={"pattern": STEP_ID_PATTERN},
    )
    uses: str = Field(description="The step type, such as http.fetch; see `automator plugins`.")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="The step's config.")
    description: str | None = None
    key: str | None = Field(
        None,
        description="Fetch steps: a template giving each item's identity, for dedupe. Transform steps: the key "
        "of each item made when the step returns a list (default: the parent's key, '/', the position).",
    )
    only_new: bool | None = Field(
        None,
        description="Fetch steps: skip items whose key an earlier run delivered (default: on when key is set).",
    )
    retry: RetryPolicy | None = None
    timeout: Duration | None = None
    when: str | None = Field(
        None,
        description="Transform, validate and deliver steps: a template; an item for which it is false passes this "
        'step untouched, such as "{{ item.urgent }}".',
    )
    group: Group | None = Field(
        None,
        description="Deliver steps: deliver the items in groups, one delivery per group (a digest); the step's "
        "templates see `items` (the group's items) and `group` (the value of `by`).",
    )

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not re.fullmatch(STEP_ID_PATTERN, value):
            raise ValueError(f"invalid step id {value!r}: start with a letter, then letters, digits, - or _")
        return value

    concurrency: int | None = Field(None, ge=1, le=1000, description="Items processed at once.")


class WorkflowSpec(SpecModel):
    """A workflow file."""

    name: str | None = Field(None, pattern=WORKFLOW_NAME_PATTERN, description="Unique; defaults to the file's stem.")
    description: str | None = None
    schedule: Schedule | None = None
    max_active_runs: int = Field(1, ge=1, le=100)
    on_overlap: Literal["queue", "skip"] = "queue"
    on_crash: Literal["resume", "fail"] = "resume"
    timeout: Duration | None = Field(None, description="For the whole run.")
    on_item_error: Literal["continue", "stop"] = Field(
        "continue",
        description="continue: a failed item is recorded and the others go on; stop: the run stops.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Parameters with their defaults; override with --param."
    )
    defaults: StepDefaults = Field(default_factory=StepDefaults)
    chunk_size: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Items per chunk: the unit of work and of crash recovery (default 100; a Batch API "
        "step asks for more).",
    )
    chunks_in_flight: int = Field(
        4, ge=1, le=1000, description="Chunks going through the steps at once: bounds memory and waiting work."
    )
    steps: list[StepSpec] = Field(min_length=1)
    on_failure: list[StepSpec] = Field(default_factory=list, description="Deliver steps run when a run fails.")
    budget: Budget | None = Field(None, description="Spending limits for model calls (per run, per day).")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(WORKFLOW_NAME_PATTERN, value):
            raise ValueError(f"invalid workflow name {value!r}: use letters, digits, ., - and _")
        return value

    @field_validator("params")
    @classmethod
    def _param_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"invalid parameter name {name!r}: use letters, digits and _")
        return value
