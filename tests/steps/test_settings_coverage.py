"""How we test from now on: every setting of every standard step, left out and set, in a real run."""

from __future__ import annotations

import importlib
from pathlib import Path

from tests.steps.coverage import COVERED
from tests.steps.reference import setting_rows, standard_step_types


def test_every_setting_of_every_standard_step_is_tested_absent_and_present() -> None:
    for module in sorted(Path(__file__).parent.glob("test_*.py")):
        importlib.import_module(f"tests.steps.{module.stem}")  # their @covers declarations
    wanted = {
        (name, setting, how)
        for name, step_type in standard_step_types().items()
        for setting, *_ in setting_rows(step_type.Config)
        for how in ("absent", "present")
    }

    missing = sorted(wanted - COVERED)
    stale = sorted(COVERED - wanted)

    assert not missing, "settings without a test in tests/steps/ (step, setting, how):\n" + "\n".join(map(str, missing))
    assert not stale, f"tests declare settings the steps do not have: {stale}"
