"""template.transform: map each item through a template or a mapping of templates."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from automator import Item, StepConfig, TransformStep, hookimpl


class TemplateTransformConfig(StepConfig):
    mapping: dict[str, Any] | None = Field(
        None, description='The new item: each value a template ("{{ item.title | upper }}") or a constant.'
    )
    template: str | None = Field(None, description="One template; its text (or value) becomes the result.")
    into: str | None = Field(
        None, description="Keep the item and put the result under this key instead of replacing the item."
    )
    merge: bool = Field(False, description="With mapping: add its keys to the item instead of replacing it.")

    @model_validator(mode="after")
    def _one_of(self) -> TemplateTransformConfig:
        if (self.mapping is None) == (self.template is None):
            raise ValueError("give exactly one of mapping or template")
        return self


class TemplateTransform(TransformStep[TemplateTransformConfig]):
    name = "template.transform"
    description = "Reshape each item with Jinja2 templates (a mapping, or one template)."

    def transform(self, item: Item) -> Any:
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
