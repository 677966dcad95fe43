"""The architecture holds: only ``automator.history`` talks to the database library.

Everything else (engine, daemon, command line, model client, the standard plugins)
speaks to the storage protocols of ``automator.history.protocols``; and every status
the history stores is a member of the enums in ``automator.history.states``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from click.testing import CliRunner

import automator
from automator.cli.main import cli
from automator.history.states import FINAL_OUTCOMES, Outcome, RunStatus
from automator.history.store import History

ROOT = Path(automator.__file__).resolve().parent.parent
STORAGE_LIBRARIES = ("sqlalchemy", "alembic")


def storage_imports(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: module`` for each import of SQLAlchemy or Alembic in one module, lazy ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in STORAGE_LIBRARIES:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {name}")
    return found


def test_only_the_history_package_imports_sqlalchemy_or_alembic() -> None:
    history = ROOT / "automator" / "history"
    modules = [
        path
        for folder in (ROOT / "automator", ROOT / "plugins")
        for path in sorted(folder.rglob("*.py"))
        if history not in path.parents
    ]
    assert len(modules) > 40, "the walk found too few modules: is ROOT right?"
    offenders = [line for path in modules for line in storage_imports(path)]
    assert offenders == [], "outside automator/history:\n" + "\n".join(offenders)


def test_the_walk_sees_imports_of_every_form(tmp_path: Path) -> None:
    # the check above must be able to fail: a module with each kind of import is caught
    module = tmp_path / "sneaky.py"
    module.write_text(
        "import sqlalchemy.orm\n"
        "from sqlalchemy.exc import SQLAlchemyError\n"
        "def later():\n"
        "    from alembic import command\n"
        "from . import sqlalchemy_like\n",
        encoding="utf-8",
    )
    found = storage_imports(module, tmp_path)
    assert [line.split(": ")[1] for line in found] == ["sqlalchemy.orm", "sqlalchemy.exc", "alembic"]


def test_runs_status_accepts_every_run_status_and_only_those(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'history.db'}"
    history = History(url)
    for status in RunStatus:
        run = history.start_run(workflow="feed", version="v1", path=None, trigger="cli")
        history.finish_run(run.id, status=status, error=None, error_step=None, counts={})
    history.close()
    runner = CliRunner()
    for status in RunStatus:
        result = runner.invoke(cli, ["--database-url", url, "runs", "--status", status.value, "--json"])
        assert result.exit_code == 0, result.output
        assert '"status": "' + status.value + '"' in result.output
    wrong = runner.invoke(cli, ["--database-url", url, "runs", "--status", "finished"])
    assert wrong.exit_code == 2
    assert "'finished' is not one of" in wrong.output
    for status in RunStatus:
        assert repr(status.value) in wrong.output


def test_stored_words_stay_the_same() -> None:
    # the history and --json hold these exact words: a renamed member would need a migration
    assert [s.value for s in RunStatus] == [
        "running",
        "succeeded",
        "failed",
        "timed_out",
        "interrupted",
        "crashed",
        "skipped",
    ]
    assert [o.value for o in Outcome] == ["pending", "delivered", "skipped", "quarantined", "failed"]
    assert [o.value for o in FINAL_OUTCOMES] == ["delivered", "skipped", "quarantined", "failed"]
