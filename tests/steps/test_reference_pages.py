"""docs/steps/<type>.md: a page per standard step type, every setting with the model's default."""

from __future__ import annotations

import re
import textwrap

import pytest
import yaml

from automator.testing import WorkflowRunner
from tests.steps.reference import DOCS, documented, page, setting_rows, standard_step_types

STEP_TYPES = standard_step_types()


def test_every_standard_step_type_has_a_page_listed_in_the_index() -> None:
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for name in STEP_TYPES:
        assert page(name).exists(), f"docs/steps/{name}.md is missing"
        assert f"]({name}.md)" in index, f"docs/steps/README.md does not link {name}"


@pytest.mark.parametrize("name", sorted(STEP_TYPES))
def test_the_page_documents_every_setting_with_the_models_default(name: str) -> None:
    expected = {key: default for key, _, default, _ in setting_rows(STEP_TYPES[name].Config)}
    shown = documented(name)

    missing = sorted(set(expected) - set(shown))
    unknown = sorted(set(shown) - set(expected))
    wrong = {key: (shown[key], expected[key]) for key in expected if key in shown and shown[key] != expected[key]}

    assert not missing, f"docs/steps/{name}.md lacks settings {missing} (run `python -m tests.steps.reference`)"
    assert not unknown, f"docs/steps/{name}.md documents settings the step does not have: {unknown}"
    assert not wrong, f"docs/steps/{name}.md: documented default != the model's: {wrong}"


@pytest.mark.parametrize("name", sorted(STEP_TYPES))
def test_the_page_says_what_the_step_produces(name: str) -> None:
    text = page(name).read_text(encoding="utf-8")
    assert re.search(r"^## (Items it produces|What it writes|What it sends)$", text, flags=re.M), name


@pytest.mark.parametrize("name", sorted(STEP_TYPES))
def test_the_pages_example_loads_as_printed(name: str, automator_runner: WorkflowRunner) -> None:
    [example] = re.findall(r"^## Example\n\n```yaml\n(.*?)^```", page(name).read_text(encoding="utf-8"), re.M | re.S)
    step = textwrap.dedent(example)
    steps = yaml.safe_load(step)
    uses = [s["uses"] for s in (steps["steps"] if isinstance(steps, dict) else steps)]
    assert name in uses
    workflow = step if step.startswith("steps:") else "steps:\n  - {id: src, uses: test.fetch}\n" + example
    workflow = "params: {day: '2026-01-01'}\n" + workflow

    automator_runner.load(workflow)  # raises WorkflowFileError with FILE:LINE:COL problems
