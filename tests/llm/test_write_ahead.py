"""Model calls are written ahead: a run killed mid-step resumes without paying twice, and its
recorded cost never falls below what the server billed.

The workflow runs in its own process (the real command line) against the fake OpenAI
server; the test kills it with SIGKILL once enough answers were given, resumes the run
with ``automator resume``, and compares the history with the server's own bill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select

from automator import History
from automator.cli.costs import cost_rows
from automator.daemon.metrics import Metrics
from automator.engine.recovery import CrashRecovery
from automator.history.daemon_store import DaemonStore
from automator.history.models import ModelCall
from automator.history.states import CallStatus
from automator.plugins.manager import load_plugins
from automator.spec.loader import load_workflow
from tests.llm.fake_openai import FakeOpenAI

ITEMS = 120
CONCURRENCY = 8
KILL_AFTER = 30  # answers given by the server before the kill


def write_flow(tmp_path: Path, *, cache: str, on_crash: str = "resume") -> Path:
    folder = tmp_path / "workflows"
    folder.mkdir()
    tickets = [{"id": i, "subject": f"ticket {i}", "body": "my invoice is wrong"} for i in range(ITEMS)]
    (folder / "items.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tickets), encoding="utf-8")
    path = folder / "classify.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            name: classify
            on_crash: {on_crash}
            steps:
              - id: read
                uses: file.fetch
                with: {{path: items.jsonl}}
                key: "{{{{ item.id }}}}"
              - id: classify
                uses: openai.transform
                concurrency: {CONCURRENCY}
                with:
                  instructions: Classify the ticket.
                  input: "{{{{ item.subject }}}}: {{{{ item.body }}}}"
                  output:
                    schema: {{category: {{enum: [billing, bug, other]}}}}
                    into: triage
                  temperature: 0.7
                  max_output_tokens: 50
                  {cache}
              - id: save
                uses: file.deliver
                with: {{path: out.jsonl}}
            """
        ).lstrip(),
        encoding="utf-8",
    )
    return path


def automator(*args: str, history_url: str, wait: bool = True) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "automator.cli.main", *args],
        env={**os.environ, "AUTOMATOR_DATABASE_URL": history_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if wait:
        process.wait(timeout=60)
    return process


def calls(history: History) -> list[ModelCall]:
    with history.session() as session:
        return list(session.scalars(select(ModelCall).order_by(ModelCall.id)))


def kill_mid_step(path: Path, history_url: str, fake_openai: FakeOpenAI) -> None:
    """Run the workflow in its own process and SIGKILL it once KILL_AFTER answers were given."""
    fake_openai.latency_s = 0.05  # answers keep arriving while the process dies
    process = automator("run", str(path), history_url=history_url, wait=False)
    try:
        fake_openai.wait_chat(
            lambda chat: sum(c.usage is not None for c in chat) >= KILL_AFTER or process.poll() is not None,
            timeout=30,
            what=f"{KILL_AFTER} answers",
        )
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)


@pytest.mark.parametrize(
    "cache",
    [
        "",  # temperature 0.7: answers are reused only by a resumed run
        # cache: false: never reused across runs, but a resumed run still must not pay
        # again for what it was answered before the crash
        "cache: false",
    ],
)
def test_a_run_killed_mid_step_pays_only_for_calls_in_flight_and_reports_at_least_the_bill(
    tmp_path: Path, history_url: str, fake_openai: FakeOpenAI, cache: str
) -> None:
    path = write_flow(tmp_path, cache=cache)
    kill_mid_step(path, history_url, fake_openai)
    history = History(history_url)
    (run,) = history.list_runs()
    assert run.status == "running"
    answered_at_kill = {c.request_id for c in calls(history) if c.status == CallStatus.OK}
    assert answered_at_kill, "no answer was recorded before the kill"
    paid_at_kill = len([c for c in fake_openai.chat_calls if c.usage is not None])

    resumed = automator("resume", str(run.id), "--json", history_url=history_url)
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert json.loads(out)["status"] == "succeeded"
    assert len(history.items(run.id, ["delivered"])) == ITEMS

    rows = calls(history)
    billed = {c.request_id: fake_openai.usage_usd(c.usage) for c in fake_openai.chat_calls if c.usage is not None}
    # no row is left waiting for an answer that can no longer come
    assert not [c for c in rows if c.status == CallStatus.SENT]
    # an answer recorded before the kill was never asked for again
    hashes = Counter(c.request_hash for c in fake_openai.chat_calls if c.usage is not None)
    by_request_id = {c.request_id: c.request_hash for c in fake_openai.chat_calls if c.usage is not None}
    assert all(hashes[by_request_id[rid]] == 1 for rid in answered_at_kill)
    # only requests in flight at the kill were paid twice: at most one per concurrent item
    assert fake_openai.paid_twice() <= CONCURRENCY
    assert len(fake_openai.completions) <= ITEMS + CONCURRENCY
    assert paid_at_kill >= KILL_AFTER
    # every answered call's recorded cost is what the server billed for it, to the nano-dollar
    answered = [c for c in rows if c.status == CallStatus.OK]
    assert {c.request_id for c in answered} <= set(billed)
    assert all(c.cost_usd == billed[c.request_id] for c in answered)
    # the calls lost in flight are recorded as unconfirmed at their upper bound, never less
    lost = [c for c in rows if c.status == CallStatus.UNCONFIRMED]
    assert len(lost) <= CONCURRENCY
    assert all(c.cost_usd == c.cost_bound_usd and c.cost_bound_usd > 0 for c in lost)
    bill = fake_openai.billed_usd()
    recorded = sum((c.cost_usd for c in rows), Decimal(0))
    assert recorded >= bill
    # `automator costs` shows the same: exact cost, plus the bound of the unconfirmed calls
    (row,) = cost_rows(history.model_calls, timedelta(days=1), "workflow")
    assert Decimal(row["cost_usd"]) == sum((c.cost_usd for c in answered), Decimal(0))
    assert Decimal(row["unconfirmed_usd"]) == sum((c.cost_bound_usd or Decimal(0) for c in lost), Decimal(0))
    assert row["unconfirmed_calls"] == len(lost)
    assert Decimal(row["cost_usd"]) + Decimal(row["unconfirmed_usd"]) >= bill
    history.close()


def test_a_crashed_run_that_is_not_resumed_records_its_lost_calls_at_their_bound(
    tmp_path: Path, history_url: str, fake_openai: FakeOpenAI
) -> None:
    # on_crash: fail: crash recovery (what the next `automator run` and the daemon do) ends
    # the crashed run instead of resuming it; the calls it had in flight still count, at
    # what they may have cost
    path = write_flow(tmp_path, cache="", on_crash="fail")
    kill_mid_step(path, history_url, fake_openai)
    history = History(history_url)
    (crashed,) = history.list_runs()
    in_flight = [c for c in calls(history) if c.run_id == crashed.id and c.status == CallStatus.SENT]
    assert 0 < len(in_flight) <= CONCURRENCY  # written before they left: the kill found them open

    recovery = CrashRecovery(history, DaemonStore(history))
    (orphan,) = recovery.orphans("classify")
    decision = recovery.take_over(orphan, load_workflow(path, load_plugins(None)))
    assert decision is not None and not decision.resume
    ended = history.get_run(crashed.id)
    assert ended is not None and ended.status == "crashed"
    rows = [c for c in calls(history) if c.run_id == crashed.id]
    assert not [c for c in rows if c.status == CallStatus.SENT]
    lost = {c.id: c for c in rows if c.status == CallStatus.UNCONFIRMED}
    assert set(lost) == {c.id for c in in_flight}
    assert all(c.cost_usd == c.cost_bound_usd for c in lost.values())
    history.close()


def test_a_call_is_recorded_before_its_request_leaves_and_counted_once_by_the_metrics(
    tmp_path: Path, history_url: str, fake_openai: FakeOpenAI
) -> None:
    # the daemon's metrics read model_calls incrementally: a row seen `sent` is counted when
    # its answer lands, once, not when it is first seen (cost 0) nor again when it changes
    path = write_flow(tmp_path, cache="")
    history = History(history_url)
    metrics = Metrics()
    metrics.read_model_usage(history.model_calls)  # the mark: nothing before this counts
    fake_openai.latency_s = 0.2
    process = automator("run", str(path), history_url=history_url, wait=False)
    try:
        # a request has arrived: its row must already be in the history, `sent`, with its bound
        fake_openai.wait_chat(lambda chat: len(chat) >= 1, timeout=30, what="a first request")
        in_flight = [c for c in calls(history) if c.status == CallStatus.SENT]
        assert in_flight and all(c.cost_bound_usd and c.cost_bound_usd > 0 for c in in_flight)
        metrics.read_model_usage(history.model_calls)  # sees rows that are still `sent`
        fake_openai.latency_s = 0.0
        assert process.wait(timeout=60) == 0, process.communicate()[1].decode()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
    metrics.read_model_usage(history.model_calls)
    metrics.read_model_usage(history.model_calls)
    counted: Counter[str] = Counter()
    cost = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "automator_model_calls_total":
                counted[sample.labels["status"]] += int(sample.value)
            elif sample.name == "automator_model_cost_usd_total":
                cost += sample.value
    assert counted == {"ok": ITEMS} and len(fake_openai.completions) == ITEMS
    assert abs(Decimal(str(cost)) - fake_openai.billed_usd()) < Decimal("1e-9")
    history.close()
