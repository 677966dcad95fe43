"""The one error hierarchy of automator.

Every error a user can see is one of these, raised where it is detected and rendered
once, by the CLI::

    AutomatorError                  anything automator reports on purpose
    ├── WorkflowFileError           a workflow file is invalid (carries Problems with FILE:LINE:COL)
    ├── PluginError                 a plugin failed to import, register or declare itself
    ├── HistoryError                the run history database cannot be opened or migrated
    ├── ConfigError                 a command-line option or parameter is wrong
    └── StepError                   a step failed while running (retryable or not)
        ├── TemplateRenderError     a template failed at run time (an undefined name, say)
        └── ModelError              a model call failed for good

    ItemSignal                      raised by a step to end one item early, not an error
    ├── SkipItem                    the item is filtered out (outcome: skipped)
    └── QuarantineItem              the item is invalid (outcome: quarantined, with a reason)
"""

from __future__ import annotations

from dataclasses import dataclass


class AutomatorError(Exception):
    """Anything automator reports on purpose; the CLI renders it without a traceback."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a workflow file, at a place in it."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"

    def as_json(self) -> dict[str, object]:
        return {"file": self.file, "line": self.line, "column": self.column, "message": self.message}


class WorkflowFileError(AutomatorError):
    """A workflow file is invalid; carries every problem found in it."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class PluginError(AutomatorError):
    """A plugin failed to import, register, or declare its step types."""


class HistoryError(AutomatorError):
    """The run history database cannot be opened, written or migrated."""


class ConfigError(AutomatorError):
    """A command-line option, parameter or setting is wrong."""


class StepError(AutomatorError):
    """A step failed while running; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool = True, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retryable = retryable


class TemplateRenderError(StepError):
    """A template failed at run time; trying again would fail the same way."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class ModelError(StepError):
    """A call to the language model failed for good."""


class ItemSignal(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a step to end one item early with an outcome other than failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SkipItem(ItemSignal):
    """The item is filtered out; its outcome is ``skipped``."""


class QuarantineItem(ItemSignal):
    """The item is invalid; its outcome is ``quarantined`` with the reason kept."""
