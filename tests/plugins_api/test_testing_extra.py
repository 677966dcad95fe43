"""What a plugin author's tests import is installed by ``automator[testing]`` (and automator itself)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def third_party_imports(source: str) -> set[str]:
    """Top-level modules imported by ``source`` that are neither stdlib nor automator's own."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m not in ("automator", "automator_standard")}


def distributions_of(modules: set[str]) -> set[str]:
    owners = importlib.metadata.packages_distributions()
    return {owners[m][0].lower().replace("_", "-") for m in modules if m in owners}


def test_the_testing_extra_installs_what_the_fixtures_and_the_guides_tests_import() -> None:
    guide = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    tests_in_guide = [b for b in re.findall(r"^```python\n(.*?)^```", guide, flags=re.M | re.S) if "def test_" in b]
    example_tests = (REPO / "examples" / "automator-example-plugin" / "tests" / "test_example_plugin.py").read_text()
    imported = third_party_imports((REPO / "automator" / "testing.py").read_text())
    for source in [*tests_in_guide, example_tests]:
        imported |= third_party_imports(source)
    imported -= {"automator_example", "acme_status"}  # the plugins under test

    core = requirement_names(PYPROJECT["project"]["dependencies"])
    testing = requirement_names(PYPROJECT["project"]["optional-dependencies"]["testing"])
    # a dependency of a declared package counts (werkzeug comes with pytest-httpserver)
    declared = set(core | testing)
    for name in list(declared):
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" not in requirement:
                declared |= requirement_names([requirement])

    assert {"pytest", "pytest-httpserver"} <= testing
    assert distributions_of(imported) <= declared, imported
    # the project's own dev set includes it, rather than repeating it
    assert "automator[testing]" in PYPROJECT["project"]["optional-dependencies"]["test"]
