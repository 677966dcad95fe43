"""template.transform: map each item through a template or a mapping of templates."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from automator import Item, StepConfig, StepError, TransformStep, hookimpl
from automator.templates import is_template


class TemplateTransformConfig(StepConfig):
    mapping: dict[str, Any] | None = Field(
        None, description='The new item: each value a template ("{{ item.title | upper }}") or a constant.'
    )
    template: str | None = Field(None, description="One template; its text (or value) becomes the result.")
    into: str | None = Field(
        None, description="Keep the item and put the result under this key instead of replacing the item."
    )
    merge: bool = Field(False, description="With mapping: add its keys to the item instead of replacing it.")
    each: str | None = Field(
        None,
        description='A template giving a list, such as "{{ item.attachments }}": the item is split into one '
        "item per element, shaped by mapping or template (if given) with the element as item.",
    )

    @model_validator(mode="after")
    def _one_of(self) -> TemplateTransformConfig:
        if self.mapping is not None and self.template is not None:
            raise ValueError("give exactly one of mapping or template")
        if self.mapping is None and self.template is None and self.each is None:
            raise ValueError("give exactly one of mapping or template (or each, to split the item)")
        if self.each is not None and not is_template(self.each):
            raise ValueError('each: must be a template giving a list, such as "{{ item.attachments }}"')
        return self


class TemplateTransform(TransformStep[TemplateTransformConfig]):
    name = "template.transform"
    description = "Reshape each item with Jinja2 templates (a mapping, or one template)."

    def transform(self, item: Item) -> Any:
        cfg = self.config
        if cfg.each is None:
            return self._shape(item)
        elements = self.render(cfg.each, item)
        if not isinstance(elements, list | tuple):
            raise StepError(f"each: gave {type(elements).__name__}, not a list", retryable=False)
        # a list: the engine makes one item of each (a split), keyed from this one
        parts = (
            Item(seq=item.seq, data=e if isinstance(e, dict) else {"value": e}, key=item.key, steps=item.steps)
            for e in elements
        )
        if cfg.mapping is None and cfg.template is None:
            return [part.data for part in parts]
        return [self._shape(part) for part in parts]

    def _shape(self, item: Item) -> Any:
        cfg = self.config
        if cfg.mapping is not None:
            result: Any = self.render(cfg.mapping, item)
            if cfg.merge and isinstance(item.data, dict):
                result = {**item.data, **result}
        else:
            assert cfg.template is not None
            result = self.render(cfg.template, item)
        if cfg.into:
            return {**item.data, cfg.into: result}
        if isinstance(result, dict):
            return result
        return {"text": result}


@hookimpl
def register_step_types(register: Any) -> None:
    register(TemplateTransform)
