"""What a step type is: the base classes plugin authors subclass.

A step type is a class with a ``name`` (``http.fetch``), a ``phase``, a pydantic
``Config`` model for its ``with:`` block, and one method per phase:

- ``FetchStep.fetch()`` returns the run's items (a list or iterable of dicts);
- ``TransformStep.transform(item)`` returns the item's new data (``None`` skips it);
  or ``transform_batch(items)`` takes them all at once, one outcome per item;
- ``ValidateStep.validate(item)`` returns nothing, or raises SkipItem/QuarantineItem/StepError;
- ``DeliverStep.deliver(item)`` delivers one item; or ``deliver_batch(items)`` all at once.

Methods may be plain functions or coroutines. A step type whose plain methods block
(disk, network) sets ``blocking = True`` and they run in worker threads.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from automator import templates

if TYPE_CHECKING:
    from automator.engine.context import RunContext


class Phase(StrEnum):
    FETCH = "fetch"
    TRANSFORM = "transform"
    VALIDATE = "validate"
    DELIVER = "deliver"


class StepConfig(BaseModel):
    """Base of every step type's config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


@dataclass
class Item:
    """One item moving through a run."""

    seq: int
    data: Any
    key: str | None = None
    # the item's data as each earlier step left it, for ``{{ steps.<id> }}``
    steps: dict[str, Any] = field(default_factory=dict)


ConfigT = TypeVar("ConfigT", bound=StepConfig)


class Step(Generic[ConfigT]):
    """Base of all step types. One instance serves one step of one run."""

    name: ClassVar[str]
    phase: ClassVar[Phase]
    Config: ClassVar[type[StepConfig]] = StepConfig
    description: ClassVar[str] = ""
    blocking: ClassVar[bool] = False
    default_concurrency: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # `class MyFetch(FetchStep[MyConfig])` is enough: take Config from the type argument
        if "Config" not in vars(cls):
            for base in getattr(cls, "__orig_bases__", ()):
                for arg in typing.get_args(base):
                    if isinstance(arg, type) and issubclass(arg, StepConfig):
                        cls.Config = arg
                        return

    def __init__(self, config: ConfigT, context: RunContext, step_id: str) -> None:
        self.config = config
        self.context = context
        self.step_id = step_id

    # -- helpers for step implementations --------------------------------------------

    def template_context(self, item: Item | None = None) -> Mapping[str, Any]:
        return self.context.template_context(item)

    def render(self, value: Any, item: Item | None = None) -> Any:
        """Render every template in ``value`` (a string, dict or list) for this item."""
        return templates.render_value(value, self.context.template_context(item))

    def render_text(self, text: str, item: Item | None = None) -> str:
        return templates.render_text(text, self.context.template_context(item))

    def resolve_path(self, path: str) -> Path:
        """A path from the workflow file, relative to the file's folder."""
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else self.context.workflow.path.parent / candidate

    def summary(self) -> str | None:
        """A line for the run summary, such as where the output went; None for nothing."""
        return None

    async def close(self) -> None:
        """Called once after the step, success or not: release connections here."""


class FetchStep(Step[ConfigT]):
    phase = Phase.FETCH

    def fetch(self) -> Iterable[Any] | Any:
        raise NotImplementedError


class TransformStep(Step[ConfigT]):
    phase = Phase.TRANSFORM

    def transform(self, item: Item) -> Any:
        raise NotImplementedError

    # A transform that takes all of a step's items at once (a Batch API, a bulk endpoint)
    # sets this (on the class or the instance) to ``transform_batch(items)`` returning
    # one outcome per item, in order: the new data, None (skipped), or a SkipItem,
    # QuarantineItem or other exception instance (that outcome for that item alone).
    # It is called once, without the step's retry and per-item timeout.
    transform_batch: ClassVar[Any] = None


class ValidateStep(Step[ConfigT]):
    phase = Phase.VALIDATE

    def validate(self, item: Item) -> Any:
        raise NotImplementedError


class DeliverStep(Step[ConfigT]):
    phase = Phase.DELIVER

    def deliver(self, item: Item) -> Any:
        raise NotImplementedError

    # A deliverer that writes all items at once (a file, a table) overrides this
    # instead; it succeeds or fails for all its items together.
    deliver_batch: ClassVar[Any] = None


StepType = type[Step[Any]]
PHASE_METHOD = {
    Phase.FETCH: "fetch",
    Phase.TRANSFORM: "transform",
    Phase.VALIDATE: "validate",
    Phase.DELIVER: "deliver",
}
