"""What a step type is: the base classes plugin authors subclass.

A step type is a class with a ``name`` (``http.fetch``), a ``phase``, a pydantic
``Config`` model for its ``with:`` block, and one method per phase:

- ``FetchStep.fetch()`` returns the run's items: a list, or an iterator or async iterator
  (a generator) that yields them page by page while the first ones already move on;
- ``TransformStep.transform(item)`` returns the item's new data (``None`` skips it);
  or ``transform_batch(items)`` takes a chunk of items at once, one outcome per item;
- ``ValidateStep.validate(item)`` returns nothing, or raises SkipItem/QuarantineItem/StepError;
- ``DeliverStep.deliver(item)`` delivers one item; or ``deliver_batch(items)`` a chunk at once.

Which of these methods a step type defines declares its :class:`Shape`, and the engine has
one driver per shape (``automator.engine.drivers``).

Methods may be plain functions or coroutines. A step type whose plain methods block
(disk, network) sets ``blocking = True`` and they run in worker threads.

Settings typed ``Templated[T]`` take either a ``T`` or a template. While a phase method
runs, ``self.config`` holds them rendered (for that item, or without one in ``fetch``
and the ``*_batch`` methods) and validated as ``T``: the per-call copy lives in a
context variable, so items handled at once each see their own values.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import inspect
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler, GetJsonSchemaHandler, TypeAdapter, ValidationError
from pydantic_core import core_schema

from automator.errors import StepError
from automator.templates import is_template

if TYPE_CHECKING:
    from automator.engine.context import RunContext


class Phase(StrEnum):
    FETCH = "fetch"
    TRANSFORM = "transform"
    VALIDATE = "validate"
    DELIVER = "deliver"


class Shape(StrEnum):
    """How the engine drives a step, declared by the methods its type defines."""

    FETCH = "fetch"  # fetch(): the run's items, a list or an (async) iterator
    PER_ITEM = "per_item"  # transform/validate/deliver(item): one item per call, several at once
    BATCH_TRANSFORM = "batch_transform"  # transform_batch(items): a chunk per call, one outcome per item
    BATCH_DELIVER = "batch_deliver"  # deliver_batch(items): a chunk per call, delivered (or failed) together


class StepConfig(BaseModel):
    """Base of every step type's config: unknown keys are errors."""

    # validate_default: a default is parsed like a written value ("30s" becomes a timedelta)
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


T = TypeVar("T")


@dataclass(frozen=True)
class _TemplatedSetting:
    """The marker ``Templated[T]`` adds: a template string is kept as written until the step runs."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def keep_templates(value: Any, validate: core_schema.ValidatorFunctionWrapHandler) -> Any:
            # syntax and names are checked by the loader, like every template of a with: block
            if isinstance(value, str) and is_template(value):
                return value
            return validate(value)

        return core_schema.no_info_wrap_validator_function(keep_templates, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        typed = handler(schema)
        template = {
            "type": "string",
            "pattern": r"\{\{|\{%",
            "description": "A template, rendered before the step runs.",
        }
        return {"anyOf": [typed, template]}


_TEMPLATED = _TemplatedSetting()

if TYPE_CHECKING:
    # to a type checker a templated setting is simply its type: that is what the step reads
    Templated = Annotated[T, _TEMPLATED]
else:

    class Templated:
        """``port: Templated[int]``: a setting that is a ``T`` or a template rendered to one.

        At load time the setting accepts a value of the type, or a template string (its
        syntax and names are checked like any other template). Before each call of the
        step's phase method it is rendered -- with ``item`` in item phases, without it in
        ``fetch`` and the ``*_batch`` methods -- and validated as ``T`` (with the field's
        constraints); a value that does not fit fails the item (or, in a fetch step, the
        run) with the setting's name and the reason.
        """

        def __class_getitem__(cls, item: Any) -> Any:
            return Annotated[item, _TEMPLATED]


@dataclass
class Item:
    """One item moving through a run."""

    seq: int
    data: Any
    key: str | None = None
    # the item's data as each earlier step left it, for ``{{ steps.<id> }}``
    steps: dict[str, Any] = field(default_factory=dict)
    # a digest (a deliver step with ``group:``): the items this one stands for; its data is
    # {"items": [their data], "group": the group's ``by`` value, "count": how many}
    members: list[Item] | None = None


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
            arguments = (arg for base in getattr(cls, "__orig_bases__", ()) for arg in typing.get_args(base))
            config = next((a for a in arguments if isinstance(a, type) and issubclass(a, StepConfig)), None)
            if config is not None:
                cls.Config = config
        if cls.__module__ == __name__:
            return  # the phase base classes: their methods only raise NotImplementedError
        # a phase method sees its templated settings rendered (see Templated)
        for name in _RENDERED_METHODS:
            method = vars(cls).get(name)
            if callable(method) and not getattr(method, "_renders_settings", False):
                setattr(cls, name, _rendering_settings(method, with_item=name in _ITEM_METHODS))

    def __init__(self, config: ConfigT, context: RunContext, step_id: str) -> None:
        self._config = config
        self.context = context
        self.step_id = step_id

    @property
    def config(self) -> ConfigT:
        """The step's settings; inside a phase method, with ``Templated`` settings rendered."""
        rendered = _rendered_config.get()
        if rendered is not None and rendered[0] is self:
            return typing.cast("ConfigT", rendered[1])
        return self._config

    @config.setter
    def config(self, value: ConfigT) -> None:
        self._config = value

    def rendered_config(self, item: Item | None = None) -> ConfigT:
        """The settings with every ``Templated`` one rendered for ``item`` and validated.

        Called for you before each phase method; call it yourself only from other code
        (a ``summary()``, say). Raises StepError naming the setting when a value does not fit.
        """
        config = self._config
        fields = _templated_fields(type(config))
        changes: dict[str, Any] = {}
        for name, adapter in fields.items():
            value = getattr(config, name)
            if not (isinstance(value, str) and is_template(value)):
                continue
            rendered = self.render(value, item)
            try:
                changes[name] = adapter.validate_python(rendered)
            except ValidationError as exc:
                reason = "; ".join(error["msg"] for error in exc.errors())
                shown = repr(rendered) if len(repr(rendered)) <= 80 else repr(rendered)[:77] + "..."
                raise StepError(
                    f"setting {name}: the template rendered to {shown}, which is not valid: {reason}",
                    retryable=False,
                ) from None
        return config.model_copy(update=changes) if changes else config

    # -- helpers for step implementations --------------------------------------------

    def template_context(self, item: Item | None = None) -> Mapping[str, Any]:
        return self.context.template_context(item)

    def render(self, value: Any, item: Item | None = None) -> Any:
        """Render every template in ``value`` (a string, dict or list) for this item."""
        return self.context.render(value, item)

    def render_text(self, text: str, item: Item | None = None) -> str:
        return self.context.render_text(text, item)

    def resolve_path(self, path: str) -> Path:
        """A path from the workflow file, relative to the file's folder."""
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else self.context.workflow.path.parent / candidate

    def summary(self) -> str | None:
        """A line for the run summary, such as where the output went; None for nothing."""
        return None

    @property
    def shape(self) -> Shape:
        """How the engine drives this step (see :class:`Shape`); from the methods the type defines."""
        if self.phase is Phase.FETCH:
            return Shape.FETCH
        if self.phase is Phase.TRANSFORM and getattr(self, "transform_batch", None) is not None:
            return Shape.BATCH_TRANSFORM
        if self.phase is Phase.DELIVER and getattr(self, "deliver_batch", None) is not None:
            return Shape.BATCH_DELIVER
        return Shape.PER_ITEM

    @property
    def chunk_size(self) -> int | None:
        """Items per chunk this step asks for (a batch step whose calls are costly), or None.

        The workflow's ``chunk_size:`` setting wins; otherwise the largest a step asks for.
        """
        return None

    async def close(self) -> None:
        """Called once after the step, success or not: release connections here."""


@dataclass(frozen=True)
class Checkpoint:
    """Yielded by a fetch generator between items: "a fetch resumed from ``state`` goes on from here".

    A run whose process died while it fetched is resumed with the fetch started again and
    ``self.resume_from`` set to the state of the last checkpoint the run's ledger holds
    (``None`` when there was none): the step starts from there (the next page's URL, a
    cursor, a byte offset), and the engine drops the items the run already took after
    that checkpoint. A fetch that yields no checkpoints is resumed from the start, the
    items the run already has dropped. ``state`` must be JSON: it is kept in the ledger.
    """

    state: Any


class FetchStep(Step[ConfigT]):
    phase = Phase.FETCH
    # where a resumed fetch goes on from: the state of the run's last Checkpoint, or None
    resume_from: Any = None

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

    def idempotency_key(self, item: Item) -> str:
        """The key a receiver uses to recognise a delivery it has already received.

        Send it with each delivery (``webhook.deliver`` sends it as ``Idempotency-Key``).
        It is the same in every attempt and run that delivers this item by this step:
        derived from the workflow's name, the step's id and the item's key (the fetch
        step's ``key:``), never from the run. An item without a key has no identity
        beyond its run: its key is derived from the run's id and the item's number,
        stable across retries and a resumed run.
        """
        return idempotency_key(self.context.workflow.name, self.step_id, item, self.context.run_id)

    # A deliverer that writes all items at once (a file, a table) overrides this
    # instead; it succeeds or fails for all its items together.
    deliver_batch: ClassVar[Any] = None


def idempotency_key(workflow: str, step_id: str, item: Item, run_id: int) -> str:
    """See :meth:`DeliverStep.idempotency_key`; ``run_id`` counts only for an item without a key."""
    identity = item.key if item.key is not None else f"run-{run_id}-item-{item.seq}"
    raw = f"{workflow}\0{step_id}\0{identity}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


# -- rendering templated settings around the phase methods ------------------------------

_ITEM_METHODS = frozenset({"transform", "validate", "deliver"})
_RENDERED_METHODS = (*sorted(_ITEM_METHODS), "fetch", "transform_batch", "deliver_batch")
# (step, its rendered config) for the phase method running in this task or thread
_rendered_config: contextvars.ContextVar[tuple[Step[Any], StepConfig] | None] = contextvars.ContextVar(
    "automator_rendered_config", default=None
)


_TEMPLATED_FIELDS: dict[type[StepConfig], dict[str, TypeAdapter[Any]]] = {}


def _templated_fields(config_type: type[StepConfig]) -> dict[str, TypeAdapter[Any]]:
    """The ``Templated`` settings of a config, each with a validator of its type and constraints."""
    known = _TEMPLATED_FIELDS.get(config_type)
    if known is not None:
        return known
    fields: dict[str, TypeAdapter[Any]] = {}
    for name, info in config_type.model_fields.items():
        if _TEMPLATED in info.metadata:
            rest = [m for m in info.metadata if m is not _TEMPLATED]
            annotation: Any = info.annotation  # typed loosely: pydantic's stubs differ between releases
            fields[name] = TypeAdapter(Annotated[(annotation, *rest)] if rest else annotation)
    _TEMPLATED_FIELDS[config_type] = fields
    return fields


def _rendering_settings(method: Callable[..., Any], *, with_item: bool) -> Callable[..., Any]:
    def enter(step: Step[Any], args: tuple[Any, ...]) -> contextvars.Token[Any] | None:
        current = _rendered_config.get()
        if not _templated_fields(type(step._config)) or (current is not None and current[0] is step):
            return None  # nothing to render, or an overriding method already rendered them
        item = args[0] if with_item and args and isinstance(args[0], Item) else None
        return _rendered_config.set((step, step.rendered_config(item)))

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def call_async_gen(self: Step[Any], *args: Any, **kwargs: Any) -> Any:
            token = enter(self, args)
            rendered = _rendered_config.get()
            if token is not None:
                _rendered_config.reset(token)
            pages = method(self, *args, **kwargs)
            while True:
                # each resumption may run in another task: the settings are set around each one
                inner = _rendered_config.set(rendered)
                try:
                    value = await pages.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    _rendered_config.reset(inner)
                yield value

        call_async_gen._renders_settings = True  # type: ignore[attr-defined]
        return call_async_gen

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def call_async(self: Step[Any], *args: Any, **kwargs: Any) -> Any:
            token = enter(self, args)
            try:
                return await method(self, *args, **kwargs)
            finally:
                if token is not None:
                    _rendered_config.reset(token)

        call_async._renders_settings = True  # type: ignore[attr-defined]
        return call_async

    @functools.wraps(method)
    def call(self: Step[Any], *args: Any, **kwargs: Any) -> Any:
        token = enter(self, args)
        try:
            result = method(self, *args, **kwargs)
            if token is not None and inspect.isgenerator(result):
                # a generator fetch reads its settings while it is consumed, page by page
                return _with_settings(result, _rendered_config.get())
            return result
        finally:
            if token is not None:
                _rendered_config.reset(token)

    call._renders_settings = True  # type: ignore[attr-defined]
    return call


def _with_settings(pages: Iterator[Any], rendered: tuple[Step[Any], StepConfig] | None) -> Iterator[Any]:
    """A generator whose every resumption sees the rendered settings (it may run in any thread)."""
    while True:
        token = _rendered_config.set(rendered)
        try:
            value = next(pages)
        except StopIteration:
            return
        finally:
            _rendered_config.reset(token)
        yield value


StepType = type[Step[Any]]
PHASE_METHOD = {
    Phase.FETCH: "fetch",
    Phase.TRANSFORM: "transform",
    Phase.VALIDATE: "validate",
    Phase.DELIVER: "deliver",
}
