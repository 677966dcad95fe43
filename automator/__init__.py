"""automator: declarative, LLM-powered workflow automation with an item ledger.

The public API for plugin authors and embedders is re-exported here.
"""

from __future__ import annotations

from automator.engine.context import RunContext
from automator.engine.runner import RunResult, run_workflow
from automator.errors import (
    AutomatorError,
    ConfigError,
    HistoryError,
    ModelError,
    PluginError,
    Problem,
    QuarantineItem,
    SkipItem,
    StepError,
    TemplateRenderError,
    WorkflowFileError,
)
from automator.history.store import History
from automator.plugins.events import (
    ItemOutcome,
    Rejection,
    RunFinished,
    RunInfo,
    RunStarted,
    StepFinished,
    StepStarted,
)
from automator.plugins.hookspecs import hookimpl
from automator.plugins.manager import Plugins, load_plugins
from automator.plugins.steps import (
    Checkpoint,
    DeliverStep,
    FetchStep,
    Item,
    Phase,
    Shape,
    Step,
    StepConfig,
    Templated,
    TransformStep,
    ValidateStep,
)
from automator.spec.durations import Duration
from automator.spec.loader import Workflow, load_workflow

__all__ = [
    "AutomatorError",
    "Checkpoint",
    "ConfigError",
    "DeliverStep",
    "Duration",
    "FetchStep",
    "History",
    "HistoryError",
    "Item",
    "ItemOutcome",
    "ModelError",
    "Phase",
    "PluginError",
    "Plugins",
    "Problem",
    "QuarantineItem",
    "Rejection",
    "RunContext",
    "RunFinished",
    "RunInfo",
    "RunResult",
    "RunStarted",
    "Shape",
    "SkipItem",
    "Step",
    "StepConfig",
    "StepError",
    "StepFinished",
    "StepStarted",
    "TemplateRenderError",
    "Templated",
    "TransformStep",
    "ValidateStep",
    "Workflow",
    "WorkflowFileError",
    "hookimpl",
    "load_plugins",
    "load_workflow",
    "run_workflow",
]
