"""Meta-tests: every hook is documented for plugin authors, with its signature, and tested."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from automator import (
    DeliverStep,
    ItemOutcome,
    Rejection,
    RunFinished,
    RunInfo,
    RunStarted,
    Step,
    StepFinished,
    StepStarted,
    TransformStep,
)
from automator.plugins import hookspecs

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "plugins.md"
TESTS = REPO / "tests"

HOOKS = sorted(name for name, value in vars(hookspecs).items() if callable(value) and hasattr(value, "automator_spec"))


def documented_signature(name: str) -> str:
    parameters = inspect.signature(getattr(hookspecs, name)).parameters
    return f"### `{name}({', '.join(parameters)})`"


def test_there_are_hooks() -> None:
    assert {"register_step_types", "get_secret", "workflow_loaded", "item_outcome"} <= set(HOOKS)
    assert not hasattr(hookspecs, "hookspec"), "the spec marker stays private; plugins need only hookimpl"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_signature(hook: str) -> None:
    assert documented_signature(hook) in DOCS.read_text(encoding="utf-8"), (
        f"docs/plugins.md has no section {documented_signature(hook)!r}: document the hook (or fix its arguments)"
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_docstring_saying_when_it_is_called(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert "Called" in doc or "called" in doc, f"hookspecs.{hook} must say when it is called"


def test_docs_describe_no_hook_that_does_not_exist() -> None:
    sections = re.findall(r"^### `(\w+)\(", DOCS.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert sorted(sections) == HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_implemented_by_some_test(hook: str) -> None:
    # a hookimpl in a test file, or in plugin source a test writes to disk
    pattern = re.compile(rf"@hookimpl(\([^)]*\))?\s*\n\s*(async\s+)?def {hook}\(")
    implemented_in = [
        path.relative_to(REPO)
        for path in TESTS.rglob("*.py")
        if path != Path(__file__) and pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert implemented_in, f"no test under tests/ implements the hook {hook!r}: add one"


EVENT_TYPES = [RunInfo, RunStarted, RunFinished, StepStarted, StepFinished, ItemOutcome, Rejection]


@pytest.mark.parametrize("event", EVENT_TYPES, ids=lambda e: e.__name__)
def test_every_field_of_an_event_is_documented(event: type) -> None:
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("## Hook reference") :]
    missing = [f.name for f in dataclasses.fields(event) if not re.search(rf"\b{f.name}\b", section)]
    assert not missing, f"docs/plugins.md (hook reference) does not name {event.__name__}'s fields {missing}"


def test_every_public_helper_of_a_step_is_documented() -> None:
    text = DOCS.read_text(encoding="utf-8")
    helpers = {
        name
        for base in (Step, DeliverStep, TransformStep)
        for name, value in vars(base).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }
    helpers -= {"fetch", "transform", "validate", "deliver"}  # the phase methods have their own table
    missing = sorted(h for h in helpers if not re.search(rf"`[^`]*\b{h}\b[^`]*`", text))
    assert not missing, f"docs/plugins.md does not mention the step helpers {missing}"
