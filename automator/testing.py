"""pytest fixtures for plugin authors: run a workflow for real and inspect what happened.

Installed with automator as a pytest plugin (entry point ``pytest11``), so a plugin's
test suite gets these fixtures without any conftest.py. They need pytest; install
``automator[testing]`` (pytest and pytest-httpserver, the loopback HTTP server the
guide's examples use). What each returns is documented in docs/plugins.md ("Testing a
plugin"): ``WorkflowRun`` and the history records it holds (``Run``, ``StepAttempt``,
``LedgerItem``), and ``CliResult``.

``automator_runner``
    Runs workflows against a fresh SQLite history database in the test's temporary
    folder and returns a :class:`WorkflowRun`: the run's row, its step attempts, the
    item ledger, the outcome counts, the lifecycle events, and what the ``test.deliver``
    steps received::

        def test_my_fetcher(automator_runner):
            result = automator_runner.run(
                '''
                steps:
                  - {id: news, uses: acme.fetch, with: {feed: "{{ params.feed }}"}}
                  - {id: out, uses: test.deliver}
                params: {feed: sports}
                ''',
                plugins=[my_plugin],
            )
            assert result.status == "succeeded"
            assert result.outcomes["delivered"] == 3
            assert [i["title"] for i in result.delivered["out"]] == ["a", "b", "c"]

``automator_history_url``
    The SQLAlchemy URL of that history database.

``automator_cli``
    Runs ``automator ARGS...`` in-process against the same database, as the console
    script would (``sys.exit(n)`` in a command gives exit code ``n``); ``plugins=`` loads
    plugins that are not installed and ``env=`` sets environment variables, both for that
    one call. Returns a :class:`CliResult`: exit code, stdout and stderr.

``automator_runner.step(workflow, step_id)``
    One step of a workflow, built as a run builds it, returned as a
    :class:`StepUnderTest` to drive directly: the engine streams items through a deliver
    step in chunks (several at once, in any order) and closes it once at the end of the
    run, and a resumed run (the same run id, perhaps in a new process) delivers the chunks
    whose delivery was not recorded and closes again. ``deliver_chunks`` and ``close`` do
    the same, so a test can deliver chunks out of order, twice, or "crash" (drop the step
    without closing, then take a new one for the same run id)::

        def test_every_item_once_after_a_crash(automator_runner):
            workflow = "steps: [{id: src, uses: test.fetch}, {id: save, uses: acme.deliver}]"
            crashed = automator_runner.step(workflow, "save", run_id=7, plugins=[my_plugin])
            chunks = crashed.chunks([{"n": n} for n in range(250)], size=100)
            crashed.deliver_chunks(chunks[:2])  # ... and the process dies
            resumed = automator_runner.step(workflow, "save", run_id=7, plugins=[my_plugin])
            resumed.deliver_chunks(chunks[1:])
            resumed.close()

Two step types exist only in these runs, to surround the step under test:
``test.fetch`` (``with: {items: [...]}``: these items, as given) and ``test.deliver``
(records each item's data; ``with: {fail_when: "{{ item.n > 2 }}"}`` fails the items
for which the template is true, without retries).
"""

from __future__ import annotations

import asyncio
import copy
import json
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
import pytest

from automator.history.states import FINAL_OUTCOMES

if TYPE_CHECKING:
    from automator.engine.runner import RunResult
    from automator.history.models import LedgerItem, Run, StepAttempt
    from automator.history.store import History
    from automator.plugins.manager import Plugins
    from automator.plugins.steps import Item, Step
    from automator.spec.loader import Workflow

__all__ = ["CliResult", "StepUnderTest", "WorkflowRun", "WorkflowRunner"]

OUTCOMES: tuple[str, ...] = tuple(outcome.value for outcome in FINAL_OUTCOMES)
_RECORDER_NAME = "automator.testing"


@dataclass
class WorkflowRun:
    """One finished run, as the history recorded it."""

    result: RunResult  # what run_workflow returned
    run: Run  # the history's row for the run; ``run.steps`` are its step attempts
    items: list[LedgerItem]  # the item ledger, in fetch order
    delivered: dict[str, list[Any]]  # test.deliver step id -> the item data it received
    events: list[Any]  # every lifecycle event (RunStarted, StepStarted, ItemOutcome, ...)
    workflow: Workflow
    plugins: Plugins = field(repr=False)

    @property
    def status(self) -> str:
        return self.run.status

    @property
    def error(self) -> str | None:
        return self.run.error

    @property
    def steps(self) -> list[StepAttempt]:
        return list(self.run.steps)

    @property
    def outcomes(self) -> dict[str, int]:
        """How many items of the ledger ended in each outcome (every outcome is a key)."""
        counted = Counter(item.outcome for item in self.items)
        return {outcome: counted.get(outcome, 0) for outcome in (*OUTCOMES, *sorted(set(counted) - set(OUTCOMES)))}

    def items_with(self, outcome: str) -> list[LedgerItem]:
        return [item for item in self.items if item.outcome == outcome]

    def step(self, step_id: str) -> StepAttempt:
        """The (last) attempt of one step."""
        found = [s for s in self.run.steps if s.step_id == step_id]
        if not found:
            raise KeyError(f"step {step_id!r} did not run; ran: {', '.join(s.step_id for s in self.run.steps)}")
        return found[-1]

    def events_of(self, kind: type) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]


class WorkflowRunner:
    """Loads and runs workflows in one folder against one history database."""

    def __init__(self, directory: Path, history_url: str) -> None:
        self.directory = directory
        self.history_url = history_url
        self._history: History | None = None

    @property
    def history(self) -> History:
        if self._history is None:
            from automator.history.store import History

            self._history = History(self.history_url)
        return self._history

    def close(self) -> None:
        if self._history is not None:
            self._history.close()
            self._history = None

    def write(self, name: str, content: str | bytes | Any) -> Path:
        """Write a file beside the workflows (data for a fetcher, say): text, bytes, or JSON."""
        path = self.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(textwrap.dedent(content).lstrip("\n"), encoding="utf-8")
        else:
            path.write_text(json.dumps(content), encoding="utf-8")
        return path

    def plugins(
        self,
        plugins: Sequence[object] = (),
        *,
        entry_points: bool = True,
        secrets: Mapping[str, str] | None = None,
        _recorder: _Recorder | None = None,
    ) -> Plugins:
        """The built-in plugins, installed ones (``entry_points``), ``plugins``, and test.*.

        A plugin given here that fails to load raises PluginError with the reason.
        """
        from automator.errors import PluginError
        from automator.plugins.manager import PluginInfo, Plugins

        loaded = Plugins()
        loaded.load_builtins()
        if entry_points:
            loaded.load_entry_points()
        for plugin in plugins:
            if loaded.pm.is_registered(plugin):
                continue  # installed, and given again: once is enough
            name = _plugin_name(plugin, taken=loaded.infos)
            info = PluginInfo(name=name, source="test", location=getattr(plugin, "__file__", None))
            if not loaded.add(plugin, info):
                raise PluginError(f"plugin {name} did not load: {info.error or 'disabled by AUTOMATOR_PLUGINS'}")
        recorder = _recorder or _Recorder(secrets or {})
        loaded.add(recorder, PluginInfo(name=_RECORDER_NAME, source="test"))
        return loaded

    def workflow_path(self, workflow: str | Path, name: str = "workflow.yaml") -> Path:
        """A path as given, or YAML text written to a file in the folder."""
        if isinstance(workflow, Path):
            return workflow
        if "\n" not in workflow and workflow.strip().endswith((".yaml", ".yml")):
            path = Path(workflow)
            return path if path.is_absolute() else self.directory / path
        return self.write(name, workflow)

    def load(
        self, workflow: str | Path, *, plugins: Sequence[object] | Plugins = (), entry_points: bool = True
    ) -> Workflow:
        """Load (validate) a workflow; raises WorkflowFileError listing its problems."""
        from automator.errors import WorkflowFileError
        from automator.plugins.manager import Plugins
        from automator.spec.loader import load_workflow

        loaded = plugins if isinstance(plugins, Plugins) else self.plugins(plugins, entry_points=entry_points)
        try:
            return load_workflow(self.workflow_path(workflow), loaded)
        except WorkflowFileError as exc:
            for failure in loaded.failures:
                exc.add_note(f"plugin {failure.name} failed to load: {failure.error}")
            raise

    async def arun(
        self,
        workflow: str | Path,
        *,
        plugins: Sequence[object] = (),
        params: dict[str, Any] | None = None,
        secrets: Mapping[str, str] | None = None,
        entry_points: bool = True,
        trigger: str = "test",
    ) -> WorkflowRun:
        """Like :meth:`run`, from a test that already has an event loop."""
        from automator.engine.runner import run_workflow

        recorder = _Recorder(secrets or {})
        loaded = self.plugins(plugins, entry_points=entry_points, _recorder=recorder)
        wf = self.load(workflow, plugins=loaded)
        result = await run_workflow(wf, self.history, loaded, params=params, trigger=trigger)
        row = self.history.get_run(result.run_id)
        assert row is not None, "the run is missing from the history"
        return WorkflowRun(
            result=result,
            run=row,
            items=self.history.items(result.run_id),
            delivered=recorder.delivered,
            events=recorder.events,
            workflow=wf,
            plugins=loaded,
        )

    def run(
        self,
        workflow: str | Path,
        *,
        plugins: Sequence[object] = (),
        params: dict[str, Any] | None = None,
        secrets: Mapping[str, str] | None = None,
        entry_points: bool = True,
        trigger: str = "test",
    ) -> WorkflowRun:
        """Load and run a workflow (a path, or YAML text) once; the run's record comes back.

        ``plugins``: plugin modules or objects to load besides the built-in and installed
        ones; ``params``: the workflow's parameters; ``secrets``: values for
        ``{{ secrets.NAME }}`` (they win over any other provider and the environment);
        ``entry_points=False`` leaves installed third-party plugins out.
        """
        return asyncio.run(
            self.arun(
                workflow, plugins=plugins, params=params, secrets=secrets, entry_points=entry_points, trigger=trigger
            )
        )

    def step(
        self,
        workflow: str | Path,
        step_id: str,
        *,
        run_id: int = 1,
        plugins: Sequence[object] = (),
        params: dict[str, Any] | None = None,
        secrets: Mapping[str, str] | None = None,
        entry_points: bool = True,
    ) -> StepUnderTest:
        """One step of a workflow (``steps`` or ``on_failure``), built as run ``run_id`` builds it.

        Nothing is written to the history: the step gets the run's context (its id,
        parameters, secrets, templates) and is driven through :class:`StepUnderTest`.
        Another call with the same ``run_id`` is the same run resumed in a new process.
        """
        from datetime import UTC, datetime

        from automator.engine.context import RunContext
        from automator.engine.runner import resolve_params
        from automator.plugins.events import RunInfo

        loaded = self.plugins(plugins, entry_points=entry_points, secrets=secrets)
        wf = self.load(workflow, plugins=loaded)
        bound = next((s for s in (*wf.steps, *wf.on_failure) if s.id == step_id), None)
        if bound is None:
            raise KeyError(f"no step {step_id!r}; steps: {', '.join(s.id for s in (*wf.steps, *wf.on_failure))}")
        info = RunInfo(id=run_id, workflow=wf.name, trigger="test", started_at=datetime.now(UTC), version=wf.version)
        context = RunContext(wf, loaded, self.history, info, resolve_params(wf, params))
        return StepUnderTest(bound.type(bound.config, context, bound.id))


@dataclass
class StepUnderTest:
    """A step built as a run builds it, driven the way the engine drives it (see ``WorkflowRunner.step``)."""

    step: Step[Any]

    @property
    def run_id(self) -> int:
        return self.step.context.run_id

    @staticmethod
    def items(data: Sequence[Any], *, first_seq: int = 0) -> list[Item]:
        """Items numbered from ``first_seq``, as a fetch makes them (a non-object value becomes ``{"value": ...}``)."""
        from automator.plugins.steps import Item

        items = []
        for seq, value in enumerate(data, start=first_seq):
            value = copy.deepcopy(value) if isinstance(value, dict) else {"value": value}
            items.append(Item(seq=seq, data=value, steps={}))
        return items

    @classmethod
    def chunks(cls, data: Sequence[Any], *, size: int = 100, first_seq: int = 0) -> list[list[Item]]:
        """The items of ``data`` cut into chunks of ``size``, in order."""
        items = cls.items(data, first_seq=first_seq)
        return [items[i : i + size] for i in range(0, len(items), size)]

    async def adeliver_chunks(self, chunks: Sequence[Sequence[Item]], *, concurrency: int = 4) -> None:
        """Each chunk through the deliver step, in the order given, up to ``concurrency`` at once.

        A step with ``deliver_batch`` gets each chunk in one call; one with ``deliver``
        gets its items one by one. Calls run in worker threads for a ``blocking`` step
        type, as the engine runs them. The first error is raised once all calls ended.
        """
        from automator.plugins.steps import DeliverStep

        step = self.step
        if not isinstance(step, DeliverStep):
            raise TypeError(f"{type(step).name} is a {step.phase} step, not a deliver step")
        blocking = type(step).blocking

        async def call(method: Callable[..., Any], argument: Any) -> None:
            result = await asyncio.to_thread(method, argument) if blocking else method(argument)
            if asyncio.iscoroutine(result):
                await result

        async def one(chunk: Sequence[Item]) -> None:
            async with limit:
                if type(step).deliver_batch is not None:
                    await call(step.deliver_batch, list(chunk))
                else:
                    for item in chunk:
                        await call(step.deliver, item)

        limit = asyncio.Semaphore(concurrency)
        results = await asyncio.gather(*(one(chunk) for chunk in chunks), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def deliver_chunks(self, chunks: Sequence[Sequence[Item]], *, concurrency: int = 4) -> None:
        """:meth:`adeliver_chunks` from a test without an event loop."""
        asyncio.run(self.adeliver_chunks(chunks, concurrency=concurrency))

    async def aclose(self) -> None:
        """The end of the run: the step's ``close()``."""
        await self.step.close()

    def close(self) -> None:
        asyncio.run(self.aclose())

    def summary(self) -> str | None:
        """The step's line in the run summary (secrets redacted, as ``automator run`` shows it)."""
        return self.step.context.redactor.text(self.step.summary())


def _plugin_name(plugin: object, taken: Mapping[str, object]) -> str:
    """A module's name, or an object's class name; numbered when two objects share a class."""
    base = getattr(plugin, "__name__", None) or type(plugin).__name__
    name, number = base, 1
    while name in taken:
        number += 1
        name = f"{base}#{number}"
    return name


# the same marker as automator.hookimpl
_impl = pluggy.HookimplMarker("automator")


class _Recorder:
    """The plugin behind test.fetch / test.deliver, the secrets= option and the events list."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        self.secrets = dict(secrets)
        self.delivered: dict[str, list[Any]] = {}
        self.events: list[Any] = []

    @_impl
    def register_step_types(self, register: Any) -> None:
        for step_type in _recorder_step_types(self):
            register(step_type)

    @_impl(tryfirst=True)
    def get_secret(self, name: str) -> str | None:
        return self.secrets.get(name)

    # trylast: the plugin under test hears each event before the recorder keeps it
    @_impl(trylast=True)
    def run_started(self, event: Any) -> None:
        self.events.append(event)

    @_impl(trylast=True)
    def run_finished(self, event: Any) -> None:
        self.events.append(event)

    @_impl(trylast=True)
    def step_started(self, event: Any) -> None:
        self.events.append(event)

    @_impl(trylast=True)
    def step_finished(self, event: Any) -> None:
        self.events.append(event)

    @_impl(trylast=True)
    def item_outcome(self, event: Any) -> None:
        self.events.append(event)


def _recorder_step_types(recorder: _Recorder) -> list[type]:
    from pydantic import Field

    from automator.errors import StepError
    from automator.plugins.steps import DeliverStep, FetchStep, StepConfig

    class TestFetchConfig(StepConfig):
        items: list[Any] = Field(default_factory=list, description="The items to produce, as given.")

    class TestFetch(FetchStep[TestFetchConfig]):
        name = "test.fetch"
        description = "Produce the items written in the workflow file (automator.testing)."

        def fetch(self) -> list[Any]:
            return copy.deepcopy(self.config.items)

    class TestDeliverConfig(StepConfig):
        fail_when: str | None = Field(None, description="A template; items for which it is true fail.")

    class TestDeliver(DeliverStep[TestDeliverConfig]):
        name = "test.deliver"
        description = "Record each item's data for the test to inspect (automator.testing)."

        def deliver(self, item: Item) -> None:
            if self.config.fail_when is not None and self.render(self.config.fail_when, item) in (True, "True"):
                raise StepError(f"test.deliver failed item {item.seq} as asked (fail_when)", retryable=False)
            recorder.delivered.setdefault(self.step_id, []).append(copy.deepcopy(item.data))

    return [TestFetch, TestDeliver]


@dataclass
class CliResult:
    """What ``automator_cli`` returns: how the command line exited and what it printed."""

    exit_code: int  # 0 succeeded, 1 failed, 2 invalid workflow file (``run``), 130 interrupted
    stdout: str
    stderr: str

    def json(self) -> Any:
        """``stdout`` parsed as JSON (for ``--json`` commands)."""
        return json.loads(self.stdout)


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def automator_history_url(tmp_path: Path) -> str:
    """A fresh SQLite history database for this test (created on first use)."""
    return f"sqlite:///{tmp_path / 'automator-history.db'}"


@pytest.fixture
def automator_runner(tmp_path: Path, automator_history_url: str) -> Iterator[WorkflowRunner]:
    """Runs workflows in a temporary folder against a temporary history; see WorkflowRunner."""
    folder = tmp_path / "workflows"
    folder.mkdir(exist_ok=True)
    runner = WorkflowRunner(folder, automator_history_url)
    yield runner
    runner.close()


@pytest.fixture
def automator_cli(
    automator_history_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., CliResult]:
    """``automator_cli("runs", "--json")``: the command line in-process, on the test's history.

    ``automator_cli(..., plugins=[module])`` loads plugins that are not installed (their
    step types, and their commands through register_commands) for that one call;
    ``env={"NAME": "value"}`` sets environment variables for that one call. The exit
    code is what the console script would exit with, ``sys.exit(n)`` in a command too.
    """
    from automator.cli.main import main

    monkeypatch.setenv("AUTOMATOR_DATABASE_URL", automator_history_url)

    def invoke(*args: str | Path, plugins: Sequence[object] = (), env: Mapping[str, str] | None = None) -> CliResult:
        capsys.readouterr()
        with monkeypatch.context() as scoped:
            for name, value in (env or {}).items():
                scoped.setenv(name, value)
            code = main([str(arg) for arg in args], plugins=plugins)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return invoke
