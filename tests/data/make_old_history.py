"""Make tests/data/history-6263ae2.sqlite: a run history written by automator at commit 6263ae2.

That commit is the release before engine v2 (issue 9). tests/core/test_old_history.py
upgrades a copy of this history with today's code and checks that it keeps working:
its runs, ledgers and costs read the same, its killed run is resumed, new runs work.

Regenerate (from the repository root; about 30 s; needs git and the test dependencies)::

    python3 tests/data/make_old_history.py                 # commit 6263ae2
    python3 tests/data/make_old_history.py --commit REV    # writes history-REV.sqlite/.json
    python3 tests/data/make_old_history.py --out-dir /tmp  # elsewhere, to look before replacing

The script extracts the commit's tree with ``git archive`` into a scratch folder and runs
*that* tree's ``automator`` (on PYTHONPATH, never installed) on copies of the workflow
files in tests/data/old_history_workflows/, with the commit's fake OpenAI server
(tests/llm/fake_openai.py) and a webhook receiver of its own, both on 127.0.0.1. The
history it leaves, in this order:

1. old-mixed, twice: a succeeded run (delivered, skipped as filtered and as a duplicate
   key, quarantined) and a failed one (an item failed; one skipped, delivered before).
2. old-broken: a run failed at its fetch, with an on_failure step.
3. old-model, twice: model calls with kept prompts, response-cache entries, then cache
   hits, and a call answered 500 and retried.
4. old-batch: the Batch API (a model_batches row, batch model calls).
5. old-notify killed by SIGKILL mid-run, then ``automator daemon`` (which resumes it),
   runs old-scheduled on its schedule and once by ``automator trigger``: rows in
   schedule_state, trigger_requests and run_recoveries.
6. What the old commands print (runs, runs show, costs, export) for all of the above:
   written to history-6263ae2.json, with which the test compares today's output.
7. old-notify killed by SIGKILL mid-run and left ``running``: the first items delivered,
   the rest pending, each having passed the ``archive`` deliver step (``delivered_by``);
   the one being posted at the kill is recorded in the .json (its Idempotency-Key too).

Paths in the database are the scratch folder's, gone afterwards. The database is written
in rollback-journal mode (a single file); today's code switches it to WAL when it opens it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent
REPO = DATA.parent.parent
WORKFLOWS = DATA / "old_history_workflows"
COMMIT = "6263ae2"
HOOK_SECRET = "OLD_HISTORY_HOOK"  # the workflows' {{ secrets.OLD_HISTORY_HOOK }}: the receiver's URL
API_KEY = "sk-old-history-0123456789abcdef"
COSTS_SINCE = "3650d"  # everything: the test reads the fixture years after it was made


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


class Receiver:
    """A webhook receiver on loopback that can kill the process posting to it, on cue."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []  # {"id", "key"} of each request, in order
        self.victim: subprocess.Popen[bytes] | None = None
        self.kill_at: int | None = None  # the request (0-based, of this round) that kills the victim
        self.in_flight: dict[str, Any] | None = None  # the request being handled at the kill
        self._round_start = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request = {"id": body.get("id"), "key": self.headers.get("Idempotency-Key")}
                with receiver._lock:
                    index = len(receiver.received) - receiver._round_start
                    receiver.received.append(request)
                if receiver.kill_at is not None and receiver.victim is not None:
                    if index == receiver.kill_at - 1:
                        # the engine writes deliveries down 0.2 s apart: this answer comes late
                        # enough that the deliveries so far are in the ledger before the next request
                        time.sleep(0.3)
                    elif index == receiver.kill_at:
                        receiver.in_flight = request
                        os.kill(receiver.victim.pid, signal.SIGKILL)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def arm(self, victim: subprocess.Popen[bytes], kill_at: int) -> None:
        with self._lock:
            self._round_start = len(self.received)
        self.victim, self.kill_at, self.in_flight = victim, kill_at, None

    def disarm(self) -> None:
        self.victim = self.kill_at = None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class OldAutomator:
    """The old commit's command line, in subprocesses, on one history and one workflows folder."""

    def __init__(self, tree: Path, scratch: Path, env: dict[str, str]) -> None:
        self.tree = tree
        self.scratch = scratch
        self.workflows = scratch / "workflows"
        self.database = scratch / "history.sqlite"
        self.env = {
            **env,
            "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'plugins'}",
            "AUTOMATOR_DATABASE_URL": f"sqlite:///{self.database}",
            "AUTOMATOR_HOME": str(scratch / "home"),
            "AUTOMATOR_DISABLE_PLUGINS": "example",  # an installed example plugin is no part of this history
            "COLUMNS": "200",
        }
        self.env.pop("VIRTUAL_ENV", None)

    def check_provenance(self) -> None:
        """The old tree's code runs, not an installed automator (PYTHONPATH comes before site-packages)."""
        code = "import automator, automator_standard; print(automator.__file__); print(automator_standard.__file__)"
        found = subprocess.run(
            [sys.executable, "-c", code], cwd=self.scratch, env=self.env, capture_output=True, text=True, check=True
        ).stdout.split()
        if not all(Path(path).is_relative_to(self.tree) for path in found):
            raise SystemExit(f"the old commit's code is not the one imported: {found}")

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "automator.cli.main", *args]

    def run(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.command(*args), cwd=self.scratch, env=self.env, capture_output=True, text=True, timeout=120
        )
        if done.returncode != expect:
            raise SystemExit(f"automator {' '.join(args)}: exit {done.returncode}, not {expect}\n{done.stderr}")
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = (self.scratch / "process.log").open("ab")
        return subprocess.Popen(self.command(*args), cwd=self.scratch, env=self.env, stdout=log, stderr=log)

    def write_items(self, name: str, items: list[dict[str, Any]]) -> None:
        (self.workflows / name).write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")

    def flow(self, name: str) -> str:
        return str(self.workflows / f"{name}.yaml")

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.database, timeout=10)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


def kill_mid_run(old: OldAutomator, receiver: Receiver, kill_at: int) -> int:
    """``automator run old-notify.yaml``, SIGKILLed by the receiver at its request ``kill_at``: the run's id."""
    process = old.start("run", old.flow("old-notify"))
    receiver.arm(process, kill_at)
    code = process.wait(60)
    receiver.disarm()
    if code != -signal.SIGKILL:
        raise SystemExit(f"the run was to be killed, but it ended with {code}: see {old.scratch / 'process.log'}")
    return int(old.query("select max(id) from runs where workflow = 'old-notify'")[0][0])


def check_killed(old: OldAutomator, run_id: int, delivered: int, pending: int) -> None:
    rows = old.query("select outcome, delivered_by from items where run_id = ? order by seq", run_id)
    outcomes = [outcome for outcome, _ in rows]
    status = old.query("select status from runs where id = ?", run_id)[0][0]
    passed = {by for outcome, by in rows if outcome == "pending"}
    expected = ["delivered"] * delivered + ["pending"] * pending
    if status != "running" or outcomes != expected or passed != {'["archive"]'}:
        raise SystemExit(f"the killed run {run_id} is {status} with {outcomes} / {passed}: not {expected}")


def make(commit: str, out: Path) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="automator-old-history-"))
    tree = scratch / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    full_commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", commit], capture_output=True, text=True, check=True
    ).stdout.strip()
    shutil.copytree(WORKFLOWS, scratch / "workflows")

    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.llm.fake_openai"], cwd=tree, stdout=subprocess.PIPE, text=True
    )
    receiver = Receiver()
    daemon: subprocess.Popen[bytes] | None = None
    try:
        assert fake.stdout is not None
        base_url = fake.stdout.readline().strip()
        env = {
            **os.environ,
            "OPENAI_BASE_URL": base_url,
            "OPENAI_API_KEY": API_KEY,
            f"AUTOMATOR_SECRET_{HOOK_SECRET}": receiver.url,
        }
        old = OldAutomator(tree, scratch, env)
        old.check_provenance()
        old.run("db", "upgrade")

        # 1. every outcome: a succeeded run, then a failed one
        old.write_items(
            "mixed.jsonl",
            [
                {"id": "m1", "title": "Disk full", "priority": "high"},
                {"id": "m2", "title": "Database down", "priority": "urgent"},
                {"id": "m3", "title": "Typo on the pricing page", "priority": "low"},
                {"id": "m4", "title": "", "priority": "high"},
                {"id": "m2", "title": "Database down (again)", "priority": "urgent"},
            ],
        )
        old.run("run", old.flow("old-mixed"))
        old.write_items(
            "mixed.jsonl",
            [
                {"id": "m1", "title": "Disk full", "priority": "high"},
                {"id": "m5", "priority": "high"},
                {"id": "m6", "title": "Certificate expires", "priority": "urgent"},
            ],
        )
        old.run("run", old.flow("old-mixed"), expect=1)

        # 2. a run that fails at its fetch
        old.run("run", old.flow("old-broken"), expect=1)

        # 3. model calls and the response cache, then cache hits and a retried 500
        old.write_items(
            "tickets.jsonl",
            [
                {"id": "t1", "text": "I was charged twice, please check my billing."},
                {"id": "t2", "text": "The app crashes with a bug when I upload a photo."},
                {"id": "t3", "text": "Where do I change my password?"},
            ],
        )
        old.run("run", old.flow("old-model"))
        old.write_items(
            "tickets.jsonl",
            [
                {"id": "t4", "text": "I was charged twice, please check my billing."},
                {"id": "t5", "text": "The app crashes with a bug when I upload a photo."},
                {"id": "t6", "text": "Hello, is there a bug in the export? !!500*1!!"},
            ],
        )
        old.run("run", old.flow("old-model"))

        # 4. the Batch API
        old.write_items(
            "batch.jsonl",
            [
                {"id": "b1", "text": "Refund my billing error"},
                {"id": "b2", "text": "Crash bug on login"},
                {"id": "b3", "text": "Just saying thanks"},
            ],
        )
        old.run("run", old.flow("old-batch"))

        # 5. a killed run the daemon resumes; the daemon's schedule and a trigger
        old.write_items("notify.jsonl", [{"id": f"n{i}", "text": f"notice {i}"} for i in range(1, 5)])
        resumed_by_daemon = kill_mid_run(old, receiver, kill_at=2)
        check_killed(old, resumed_by_daemon, delivered=2, pending=2)
        old.write_items("scheduled.jsonl", [{"id": "s1"}, {"id": "s2"}])
        daemon = old.start("daemon", "--workflows", str(old.workflows), "--keep", "forever", "--log-format", "json")
        wait_for(
            lambda: old.query("select status from runs where id = ?", resumed_by_daemon)[0][0] == "succeeded",
            30,
            "the daemon to resume the killed run",
        )
        wait_for(
            lambda: (
                old.query("select count(*) from runs where trigger = 'schedule' and status = 'succeeded'")[0][0] >= 2
            ),
            30,
            "two scheduled runs",
        )
        old.run("trigger", "old-scheduled", "--timeout", "20s")
        wait_for(
            lambda: old.query("select status from runs where trigger = 'manual'") == [("succeeded",)],
            30,
            "the triggered run",
        )
        daemon.send_signal(signal.SIGTERM)
        if daemon.wait(60) != 0:
            raise SystemExit(f"the daemon exited with {daemon.returncode}: see {scratch / 'process.log'}")
        daemon = None

        # 6. what the old commands print, for the test to compare
        runs = old.json("runs", "--limit", "1000")
        printed = {
            "runs": runs,
            "runs_show": {str(run["id"]): old.json("runs", "show", str(run["id"])) for run in runs},
            "costs": {by: old.json("costs", "--since", COSTS_SINCE, "--by", by) for by in ("workflow", "day", "step")},
            "export_finetune": old.run(
                "export", "finetune", "--workflow", "old-model", "--step", "classify"
            ).stdout.splitlines(),
        }

        # 7. a run left running: killed while posting its fifth item
        old.write_items("notify.jsonl", [{"id": f"n{i}", "text": f"notice {i}"} for i in range(5, 13)])
        killed = kill_mid_run(old, receiver, kill_at=4)
        check_killed(old, killed, delivered=4, pending=4)
        assert receiver.in_flight is not None
        facts = {
            "commit": full_commit,
            "costs_since": COSTS_SINCE,
            "hook_secret": HOOK_SECRET,
            "killed_run": {
                "id": killed,
                "workflow": "old-notify",
                "delivered": [f"n{i}" for i in range(5, 9)],
                "pending": [f"n{i}" for i in range(9, 13)],
                "in_flight": receiver.in_flight,
            },
        }
    finally:
        if daemon is not None:
            daemon.kill()
            daemon.wait()
        receiver.close()
        fake.terminate()
        fake.wait(10)

    # one file: the write-ahead log folded in, rollback-journal mode, compacted
    conn = sqlite3.connect(old.database)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        conn.execute("PRAGMA journal_mode=DELETE").fetchall()
        conn.execute("VACUUM")
    finally:
        conn.close()
    shutil.copyfile(old.database, out)
    shutil.rmtree(scratch)
    return {"facts": facts, "printed": printed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default=COMMIT, help=f"the commit whose automator writes the history ({COMMIT})")
    parser.add_argument("--out-dir", type=Path, default=DATA, help="where to write (default: tests/data)")
    args = parser.parse_args()
    out = args.out_dir / f"history-{args.commit}.sqlite"
    expected = make(args.commit, out)
    out.with_suffix(".json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size:,} bytes) and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
