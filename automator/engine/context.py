"""What a run knows while it runs: parameters, secrets, the template context, redaction."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from automator.errors import TemplateRenderError
from automator.redaction import Redactor

if TYPE_CHECKING:
    from automator.history.store import History
    from automator.plugins.events import RunInfo
    from automator.plugins.manager import Plugins
    from automator.plugins.steps import Item
    from automator.spec.loader import Workflow

SECRET_ENV_PREFIX = "AUTOMATOR_SECRET_"


class Secrets(Mapping[str, str]):
    """``{{ secrets.NAME }}``: a secrets plugin, then $AUTOMATOR_SECRET_NAME, then $NAME."""

    def __init__(self, plugins: Plugins, redactor: Redactor) -> None:
        self._plugins = plugins
        self._redactor = redactor

    def lookup(self, name: str) -> str | None:
        value = self._plugins.get_secret(name)
        if value is None:
            value = os.environ.get(SECRET_ENV_PREFIX + name, os.environ.get(name))
        if value is not None:
            self._redactor.add(value)
        return value

    def __getitem__(self, name: str) -> str:
        value = self.lookup(name)
        if value is None:
            raise TemplateRenderError(
                f"secret {name!r} is not set: export {SECRET_ENV_PREFIX}{name} (or {name}) "
                "or provide it with a secrets plugin"
            )
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(())  # secrets are never listed

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "<secrets>"


@dataclass
class RunContext:
    """One run's view of the world, handed to every step."""

    workflow: Workflow
    plugins: Plugins
    history: History
    info: RunInfo
    params: dict[str, Any]
    redactor: Redactor = field(default_factory=Redactor)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. run.error for on_failure steps

    def __post_init__(self) -> None:
        self.secrets = Secrets(self.plugins, self.redactor)
        self._run_vars: dict[str, Any] = {
            "id": self.info.id,
            "workflow": self.info.workflow,
            "trigger": self.info.trigger,
            "started_at": self.info.started_at.isoformat(),
            "scheduled_for": self.info.scheduled_for.isoformat() if self.info.scheduled_for else None,
            "version": self.info.version,
        }
        self._base = {"run": self._run_vars, "secrets": self.secrets, "params": self.params, "steps": {}}

    @property
    def run_id(self) -> int:
        return self.info.id

    def set_run_vars(self, **values: Any) -> None:
        self._run_vars.update(values)

    def template_context(self, item: Item | None = None) -> Mapping[str, Any]:
        if item is None:
            return self._base
        if item.members is not None:  # a digest: its templates read `items` and `group`
            data = item.data
            return {**self._base, "item": data, "steps": item.steps, "items": data["items"], "group": data["group"]}
        return {**self._base, "item": item.data, "steps": item.steps}

    # rendering uses the templates of this run's plugins: their filters and globals only

    def render(self, value: Any, item: Item | None = None) -> Any:
        """Render every template in ``value`` (a string, dict or list) for ``item`` (or none)."""
        return self.plugins.templates.render_value(value, self.template_context(item))

    def render_text(self, text: str, item: Item | None = None) -> str:
        return self.plugins.templates.render_text(text, self.template_context(item))

    def add_secret(self, value: str) -> None:
        """Keep a secret a step read by itself (an API key, say) out of everything written."""
        self.redactor.add(value)
