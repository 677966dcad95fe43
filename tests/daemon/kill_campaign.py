"""The kill campaign of issue 9: runs SIGKILLed mid-way, restarted, and what the crash cost.

A trial runs file.fetch (200 items with keys) → openai.transform (the fake OpenAI server,
with latency) → webhook.deliver (concurrency 4, to a receiver that holds each answer a
little) under ``automator daemon`` (started by ``automator trigger``) or as ``automator
run``; kills the process when ``kill_when`` returns; waits until what the dead process had
sent has landed; restarts it (the daemon resumes the run, ``automator run`` resumes it
before its own run) and waits for the end. Then it reads the history database and the
two servers' records and counts what the crash cost: items without an outcome, runs
left unfinished, deliveries sent again, model calls paid again, paid calls not recorded.

Everything is observed from outside (processes, the history database, the servers), so
the same campaign measures any engine. Shared by tests/daemon/test_kill_campaign.py (a
few trials, kill points chosen by events) and benchmarks/kill_bench.py (many trials,
random kill points).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pytest_httpserver import HTTPServer

from tests.daemon.conftest import DaemonProcess, Post, Receiver
from tests.llm.fake_openai import ChatCall, FakeOpenAI

REPO = Path(__file__).resolve().parents[2]
ITEMS = 200
WEBHOOK_CONCURRENCY = 4
API_KEY = "sk-kill-campaign-0123456789abcdef"
# An answer that came back this shortly before the kill may not be recorded yet (group
# commit batches the writes of concurrent items): such a request counts as in flight.
GRACE_S = 0.05
# how long a restarted process may take to finish the run
FINISH_TIMEOUT_S = 90.0

WORKFLOW = """\
name: {name}
steps:
  - id: read
    uses: file.fetch
    with: {{path: items.jsonl}}
    key: "{{{{ item.id }}}}"
  - id: classify
    uses: openai.transform
    with:
      instructions: "Sort the support ticket into a category."
      input: "{{{{ item.text }}}}"
      output: {{schema: {{category: [billing, bug, other]}}, into: answer}}
      max_output_tokens: 20
  - id: post
    uses: webhook.deliver
    concurrency: {concurrency}
    with:
      url: "{url}"
      body: {{id: "{{{{ item.id }}}}", category: "{{{{ item.answer.category }}}}"}}
"""

Mode = Literal["daemon", "run"]


def in_flight(arrived: float, answered: float | None, killed: float, restarted: float) -> bool:
    """Sent by the killed process (before the restart) and not answered before the kill."""
    return arrived < restarted and (answered is None or answered > killed)


@dataclass
class TrialResult:
    """What one kill cost. Counts are over the trial's history database and servers."""

    number: int
    mode: Mode
    kill_point: str  # "1.23 s after start", "after 20 POSTs", ...
    finished: bool  # the restarted process ended the run in time
    items_without_outcome: int  # ledger rows still pending after the end
    unfinished_runs: int  # runs still running (or crashed, never resumed) after the end
    undelivered: int  # items whose POST never reached the receiver
    posts_in_flight: int  # POSTs sent by the killed process and not yet answered at the kill
    resent: int  # POSTs of an item the receiver had already received
    resent_other_key: int  # of those, carrying an Idempotency-Key other than the first one's
    resent_not_in_flight: int  # re-sent items whose earlier POST was answered (GRACE_S) before the kill
    calls_in_flight: int  # model calls sent by the killed process and not yet answered at the kill
    paid_twice: int  # model answers billed for a request billed before
    paid_twice_answered: int  # of those, for a call whose answer the history had recorded
    billed_usd: Decimal  # what the model server billed
    recorded_usd: Decimal  # model_calls' cost in the history (unconfirmed rows excepted)
    bound_usd: Decimal | None  # unconfirmed calls' cost bound, where the history has the column
    unrecorded_calls: int  # billed answers neither recorded nor covered by an unconfirmed row
    cost_mismatches: int  # model_calls rows whose cost differs from what their answer was billed
    notes: list[str] = field(default_factory=list)

    @property
    def cost_difference_usd(self) -> Decimal:
        """Billed minus recorded: > 0 means paid calls the history does not show."""
        return self.billed_usd - self.recorded_usd

    def violations(self) -> list[str]:
        """The issue's targets this trial missed, in words."""
        found = [f"trial {self.number} ({self.mode}, killed {self.kill_point}): {note}" for note in self.notes]
        checks = [
            (not self.finished, "the restarted process did not end the run"),
            (self.items_without_outcome > 0, f"{self.items_without_outcome} items without an outcome"),
            (self.unfinished_runs > 0, f"{self.unfinished_runs} runs left running"),
            (self.undelivered > 0, f"{self.undelivered} items never delivered"),
            (
                self.resent > WEBHOOK_CONCURRENCY,
                f"{self.resent} deliveries re-sent (concurrency {WEBHOOK_CONCURRENCY}, "
                f"{self.posts_in_flight} in flight at the kill)",
            ),
            (self.resent_other_key > 0, f"{self.resent_other_key} re-sent with another Idempotency-Key"),
            # resent_not_in_flight is reported, not judged: a POST the receiver answered is still in
            # flight for the engine until its result is written down, which under load takes
            # longer than any fixed window; the bound the issue sets is the step's concurrency
            (
                self.paid_twice_answered > 0,
                f"{self.paid_twice_answered} model calls paid again although their answer was recorded",
            ),
            (self.unrecorded_calls > 0, f"{self.unrecorded_calls} answered model calls not recorded"),
            (self.cost_mismatches > 0, f"{self.cost_mismatches} model calls recorded at another cost"),
        ]
        found += [f"trial {self.number} ({self.mode}, killed {self.kill_point}): {text}" for bad, text in checks if bad]
        return found


@dataclass
class Trial:
    """One trial's files, processes and kill time; ``kill_when(trial)`` blocks until the moment to kill."""

    number: int
    mode: Mode
    folder: Path
    fake: FakeOpenAI
    receiver: Receiver
    started: float = 0.0  # time.monotonic() when the run started (daemon: its trigger answered)
    killed: float = 0.0
    restarted: float = 0.0
    run_id: int | None = None
    missed: str | None = None  # why the kill hit no run (it had ended)

    @property
    def name(self) -> str:
        return f"kill{self.number:03d}"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.folder / 'history.db'}"

    @property
    def workflows(self) -> Path:
        return self.folder / "workflows"

    @property
    def flow(self) -> Path:
        return self.workflows / f"{self.name}.yaml"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "AUTOMATOR_DATABASE_URL": self.database_url,
            "AUTOMATOR_HOME": str(self.folder / "home"),
            # this tree's engine and standard steps, whatever copy is installed
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")]),
            "OPENAI_BASE_URL": self.fake.base_url,
            "OPENAI_API_KEY": API_KEY,
        }

    def write_files(self) -> None:
        self.workflows.mkdir(parents=True)
        words = ["charged twice", "app crashes", "refund please", "login fails", "invoice missing"]
        # the trial's number in every text: no two trials send the same prompt
        lines = (
            json.dumps({"id": i, "text": f"Ticket {self.number}-{i}: {words[i % len(words)]}"}) for i in range(ITEMS)
        )
        (self.workflows / "items.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        self.flow.write_text(
            WORKFLOW.format(name=self.name, concurrency=WEBHOOK_CONCURRENCY, url=self.receiver.url), encoding="utf-8"
        )

    def automator(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "automator.cli.main", *args]

    # -- the story: start, kill, restart, end ---------------------------------------------

    def play(self, kill_when: Callable[[Trial], str]) -> TrialResult:
        self.write_files()
        kill_point = self._start_and_kill(kill_when)
        # what the dead process sent still lands; count it before anything new is sent
        self.receiver.wait_idle()
        self.fake.wait_chat(lambda calls: all(c.answered is not None for c in calls), 30, "model calls in flight")
        self.restarted = time.monotonic()
        finished, notes = self._restart_and_finish()
        return self.measure(kill_point, finished, notes + ([self.missed] if self.missed else []))

    def _start_and_kill(self, kill_when: Callable[[Trial], str]) -> str:
        log = self.folder / "process.log"
        if self.mode == "daemon":
            daemon = DaemonProcess(self.workflows, self.database_url, log, env=self.env())
            trigger: subprocess.Popen[str] | None = None
            try:
                daemon.start()  # first: it creates the history database the trigger writes to
                trigger = subprocess.Popen(
                    self.automator("trigger", self.name, "--json", "--timeout", "60s"),
                    env=self.env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                out, err = trigger.communicate(timeout=60)
                if trigger.returncode != 0:
                    raise AssertionError(f"automator trigger failed: {err}")
                self.run_id = int(json.loads(out)["run_id"])
                self.started = time.monotonic()
                kill_point = kill_when(self)
                self.killed = time.monotonic()
                daemon.kill()
            finally:
                daemon.close()
                if trigger is not None and trigger.poll() is None:
                    trigger.kill()
                    trigger.wait(10)
            return kill_point
        with log.open("ab") as out_file:
            process = subprocess.Popen(
                self.automator("run", str(self.flow), "--json"), env=self.env(), stdout=out_file, stderr=out_file
            )
        try:
            self.started = time.monotonic()
            kill_point = kill_when(self)
            self.killed = time.monotonic()
            process.kill()
            process.wait(10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        if process.returncode != -9:
            self.missed = f"the run ended (exit {process.returncode}) before the kill"
        return kill_point

    def _restart_and_finish(self) -> tuple[bool, list[str]]:
        log = self.folder / "restart.log"
        if self.mode == "daemon":
            daemon = DaemonProcess(self.workflows, self.database_url, log, env=self.env())
            try:
                daemon.start()
                deadline = time.monotonic() + FINISH_TIMEOUT_S
                while self._run_status() in ("running", "crashed"):
                    if time.monotonic() > deadline:
                        return False, [f"run {self.run_id} still {self._run_status()} after {FINISH_TIMEOUT_S:.0f} s"]
                    daemon.healthy()  # raises if the daemon died
                    time.sleep(0.05)  # polling the history: the daemon tells us nothing else
            finally:
                daemon.close()  # killed: the run has ended, nothing is left to write
            return True, []
        try:
            done = subprocess.run(
                self.automator("run", str(self.flow), "--json"),
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=FINISH_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False, [f"the second `automator run` did not end within {FINISH_TIMEOUT_S:.0f} s"]
        log.write_text(done.stdout + done.stderr, encoding="utf-8")
        if done.returncode != 0:
            return True, [f"the second `automator run` exited {done.returncode}: {done.stderr.strip()[-300:]}"]
        return True, []

    def _run_status(self) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT status FROM runs WHERE id = ?", (self.run_id,)).fetchone()
        return None if row is None else str(row[0])

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.folder / 'history.db'}?mode=ro", uri=True, timeout=30)

    # -- counting ------------------------------------------------------------------------

    def measure(self, kill_point: str, finished: bool, notes: list[str]) -> TrialResult:
        with self._db() as db:
            pending = db.execute("SELECT count(*) FROM items WHERE outcome = 'pending'").fetchone()[0]
            unfinished = db.execute("SELECT count(*) FROM runs WHERE status IN ('running', 'crashed')").fetchone()[0]
            columns = {row[1] for row in db.execute("PRAGMA table_info(model_calls)")}
            bound_column = "cost_bound_usd" in columns
            rows = db.execute(
                "SELECT request_id, status, CAST(cost_usd AS TEXT)"
                + (", CAST(cost_bound_usd AS TEXT)" if bound_column else ", NULL")
                + " FROM model_calls"
            ).fetchall()
        posts = list(self.receiver.posts)  # the receiver is idle: nothing changes them now
        calls = list(self.fake.chat_calls)
        result = TrialResult(
            number=self.number,
            mode=self.mode,
            kill_point=kill_point,
            finished=finished,
            items_without_outcome=int(pending),
            unfinished_runs=int(unfinished),
            undelivered=ITEMS - len({str((p.body or {}).get("id")) for p in posts}),
            posts_in_flight=0,
            resent=0,
            resent_other_key=0,
            resent_not_in_flight=0,
            calls_in_flight=sum(in_flight(c.arrived, c.answered, self.killed, self.restarted) for c in calls),
            paid_twice=0,
            paid_twice_answered=0,
            billed_usd=sum((FakeOpenAI.usage_usd(c.usage) for c in calls if c.usage), Decimal(0)),
            recorded_usd=Decimal(0),
            bound_usd=Decimal(0) if bound_column else None,
            unrecorded_calls=0,
            cost_mismatches=0,
            notes=notes,
        )
        self._count_posts(result, posts)
        self._count_calls(result, calls, rows)
        return result

    def _count_posts(self, result: TrialResult, posts: list[Post]) -> None:
        result.posts_in_flight = sum(in_flight(p.arrived, p.answered, self.killed, self.restarted) for p in posts)
        by_item: dict[str, list[Post]] = defaultdict(list)
        for post in posts:
            by_item[str((post.body or {}).get("id"))].append(post)
        for sent in by_item.values():
            if len(sent) < 2:
                continue
            result.resent += len(sent) - 1
            result.resent_other_key += sum(1 for p in sent[1:] if p.key != sent[0].key)
            first = sent[0]
            if first.answered is not None and first.answered <= self.killed - GRACE_S:
                result.resent_not_in_flight += len(sent) - 1

    def _count_calls(
        self, result: TrialResult, calls: list[ChatCall], rows: list[tuple[str | None, str, str, str | None]]
    ) -> None:
        """Model calls, judged by what the engine knew: a call whose answer it had written down
        must never be paid again; an answer the kill took before it was written down must be
        covered by an ``unconfirmed`` row at its bound. (The server's clock only tells when it
        answered: reading and writing down an answer takes the client a moment, more under
        load, so no time window after the answer can stand for "in flight".)"""
        recorded: dict[str, Decimal] = {}
        unconfirmed = 0
        for request_id, status, cost, bound in rows:
            if status == "unconfirmed":
                unconfirmed += 1
                result.bound_usd = (result.bound_usd or Decimal(0)) + Decimal(bound or 0)
                continue
            result.recorded_usd += Decimal(cost or 0)
            if request_id is not None and status != "cached":
                recorded[request_id] = recorded.get(request_id, Decimal(0)) + Decimal(cost or 0)
        paid: dict[str, list[ChatCall]] = defaultdict(list)
        for call in calls:
            if call.usage is not None:
                paid[call.request_hash].append(call)
        for answers in paid.values():
            result.paid_twice += len(answers) - 1
            first = answers[0]
            if len(answers) > 1 and first.request_id is not None and first.request_id in recorded:
                result.paid_twice_answered += len(answers) - 1
        lost = 0
        for call in calls:
            if call.usage is None or call.request_id is None:
                continue
            if call.request_id not in recorded:
                lost += 1
            elif abs(recorded[call.request_id] - FakeOpenAI.usage_usd(call.usage)) > Decimal("1e-9"):
                result.cost_mismatches += 1
        # every billed answer is recorded at its cost, or was lost in the kill and is one of
        # the unconfirmed calls (costed at their bound)
        result.unrecorded_calls = max(0, lost - unconfirmed)


class Campaign:
    """The servers that outlive trials (the fake OpenAI server, the receiver's HTTP server) and the trials."""

    def __init__(
        self, folder: Path, fake: FakeOpenAI, http: HTTPServer, *, latency_s: float = 0.03, hold_s: float = 0.02
    ) -> None:
        self.folder = folder
        self.fake = fake
        self.http = http
        self.latency_s = latency_s
        self.hold_s = hold_s  # the receiver holds each answer this long: deliveries are in flight at a kill

    def trial(self, number: int, mode: Mode, kill_when: Callable[[Trial], str]) -> TrialResult:
        self.fake.reset()
        self.fake.latency_s = self.latency_s
        self.fake.api_key = API_KEY
        self.http.clear()
        receiver = Receiver(self.http, delay=self.hold_s)
        folder = self.folder / f"trial{number:03d}"
        return Trial(number, mode, folder, self.fake, receiver).play(kill_when)


def summary(results: list[TrialResult]) -> dict[str, object]:
    """The campaign in numbers: totals, and per kill the worst and the mean."""
    count = len(results) or 1
    modes = Counter(r.mode for r in results)
    bounds = [r.bound_usd for r in results if r.bound_usd is not None]
    return {
        "trials": len(results),
        "modes": dict(modes),
        "not_finished": sum(not r.finished for r in results),
        "items_without_outcome": sum(r.items_without_outcome for r in results),
        "runs_with_lost_items": sum(r.items_without_outcome > 0 for r in results),
        "unfinished_runs": sum(r.unfinished_runs for r in results),
        "undelivered": sum(r.undelivered for r in results),
        "resent_total": sum(r.resent for r in results),
        "resent_max": max((r.resent for r in results), default=0),
        "resent_mean": sum(r.resent for r in results) / count,
        "kills_with_resends": sum(r.resent > 0 for r in results),
        "posts_in_flight_max": max((r.posts_in_flight for r in results), default=0),
        "posts_in_flight_mean": sum(r.posts_in_flight for r in results) / count,
        "resent_beyond_in_flight": sum(max(r.resent - r.posts_in_flight, 0) for r in results),
        "resent_other_key": sum(r.resent_other_key for r in results),
        "resent_not_in_flight": sum(r.resent_not_in_flight for r in results),
        "paid_twice_total": sum(r.paid_twice for r in results),
        "paid_twice_max": max((r.paid_twice for r in results), default=0),
        "paid_twice_mean": sum(r.paid_twice for r in results) / count,
        "kills_with_paid_twice": sum(r.paid_twice > 0 for r in results),
        "paid_twice_answered": sum(r.paid_twice_answered for r in results),
        "calls_in_flight_max": max((r.calls_in_flight for r in results), default=0),
        "calls_in_flight_mean": sum(r.calls_in_flight for r in results) / count,
        "billed_usd": sum((r.billed_usd for r in results), Decimal(0)),
        "recorded_usd": sum((r.recorded_usd for r in results), Decimal(0)),
        "bound_usd": sum(bounds, Decimal(0)) if bounds else None,
        "runs_under_reported": sum(r.cost_difference_usd > Decimal("1e-9") for r in results),
        "unrecorded_calls": sum(r.unrecorded_calls for r in results),
        "cost_mismatches": sum(r.cost_mismatches for r in results),
    }
