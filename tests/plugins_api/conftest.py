"""Helpers for the plugin API's tests: plugins as real files, distributions as real metadata."""

from __future__ import annotations

import importlib
import itertools
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

_counter = itertools.count()


def unique(prefix: str) -> str:
    """A module or plugin name no other test uses (modules stay in sys.modules)."""
    return f"{prefix}_{next(_counter)}"


@pytest.fixture
def plugins_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    return folder


@pytest.fixture
def write_plugin(plugins_dir: Path) -> Callable[[str, str], Path]:
    """Write ``plugins/NAME.py`` from dedented source; returns its path."""

    def write(name: str, source: str) -> Path:
        path = plugins_dir / f"{name}.py"
        path.write_text(textwrap.dedent(source).lstrip("\n"), encoding="utf-8")
        return path

    return write


@pytest.fixture
def install_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """'Install' a distribution the way pip leaves it: a module and a .dist-info on sys.path.

    importlib.metadata (and so automator's entry-point discovery) finds it exactly as it
    finds a pip-installed package. Returns the module's (unique) name.
    """
    site = tmp_path / "site-packages"
    site.mkdir(exist_ok=True)
    monkeypatch.syspath_prepend(str(site))
    added: list[str] = []

    def install(entry_point: str, source: str, *, dist: str | None = None, version: str = "1.0.0") -> str:
        module = unique(entry_point.replace("-", "_") + "_mod")
        dist = dist or unique("automator-test-dist").replace("_", "-")
        (site / f"{module}.py").write_text(textwrap.dedent(source).lstrip("\n"), encoding="utf-8")
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
        (info / "entry_points.txt").write_text(f"[automator]\n{entry_point} = {module}\n", encoding="utf-8")
        importlib.invalidate_caches()
        added.append(module)
        return module

    yield install
    for module in added:
        sys.modules.pop(module, None)
