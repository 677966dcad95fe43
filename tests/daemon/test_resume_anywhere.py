"""A run killed mid-delivery is finished from anywhere: the next `automator run`, `automator resume ID`,
or a daemon; and whoever resumes it skips the items another run delivered meanwhile."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from automator.history.daemon_store import DaemonStore
from automator.history.store import History
from tests.daemon.conftest import DaemonProcess, wait_for

IDS = [f"t{i}" for i in range(6)]
HELD = "t2"  # the delivery in flight when the run is killed

# no on_crash: the default, resume
FLOW = """
name: notify
{on_crash}
steps:
  - id: read
    uses: file.fetch
    with: {{path: items.jsonl}}
    key: "{{{{ item.id }}}}"
  - id: post
    uses: webhook.deliver
    concurrency: 1
    retry: {{attempts: 1}}
    with: {{url: "{url}", body: {{id: "{{{{ item.id }}}}"}}}}
"""


class HoldingReceiver:
    """A webhook receiver on loopback that keeps some deliveries waiting until the test lets them go.

    The first delivery of each held item is recorded, then held: the test knows the
    request arrived (``arrived[id]``) and decides when it is answered (``release[id]``).
    Every other delivery takes 0.25 s, a slow receiver, so that the sender records each
    delivery before it sends the next one.
    """

    def __init__(self, server: HTTPServer, held: tuple[str, ...] = (HELD,)) -> None:
        self.server = server
        self.arrived = {item: threading.Event() for item in held}
        self.release = {item: threading.Event() for item in held}
        self.requests: list[tuple[str | None, str]] = []  # (Idempotency-Key, item id)
        self._lock = threading.Lock()
        self._pause = threading.Event()  # never set: the slow receiver's wait
        server.expect_request("/hook", method="POST").respond_with_handler(self._handle)

    @property
    def url(self) -> str:
        return self.server.url_for("/hook")

    def _handle(self, request: Request) -> Response:
        item = request.get_json()["id"]
        with self._lock:
            self.requests.append((request.headers.get("Idempotency-Key"), item))
        if item in self.arrived and not self.arrived[item].is_set():
            self.arrived[item].set()
            self.release[item].wait(60)
        else:
            self._pause.wait(0.25)
        return Response("ok")

    def let_go(self) -> None:
        for event in self.release.values():
            event.set()

    def deliveries(self) -> Counter[str]:
        with self._lock:
            return Counter(item for _, item in self.requests)

    def keys_of(self, item: str) -> set[str | None]:
        with self._lock:
            return {key for key, seen in self.requests if seen == item}


def start_run(flow: Path, history_url: str, *args: str) -> subprocess.Popen[str]:
    """``automator ARGS`` (default: ``run FLOW``) in its own process."""
    return subprocess.Popen(
        [sys.executable, "-m", "automator.cli.main", *(args or ("run", str(flow)))],
        env={**os.environ, "AUTOMATOR_DATABASE_URL": history_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def write_flow(workflows: Path, url: str, on_crash: str = "") -> Path:
    (workflows / "items.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in IDS))
    flow = workflows / "notify.yaml"
    flow.write_text(FLOW.format(on_crash=on_crash, url=url).lstrip())
    return flow


def outcomes(history_url: str, run_id: int) -> dict[str, tuple[str, str | None]]:
    history = History(history_url)
    try:
        return {row.key: (row.outcome, row.reason) for row in history.items(run_id)}
    finally:
        history.close()


def kill_mid_delivery(flow: Path, history_url: str, receiver: HoldingReceiver) -> int:
    """`automator run FLOW`, SIGKILLed while the receiver holds the delivery of HELD; its pid."""
    process = start_run(flow, history_url)
    try:
        assert receiver.arrived[HELD].wait(30), "the run never reached the receiver"
        # the deliveries before the held one are in the ledger (each took the receiver 0.25 s)
        wait_for(
            lambda: [outcomes(history_url, 1).get(i, ("", None))[0] for i in IDS[:2]] == ["delivered"] * 2,
            10,
            "the first deliveries to be recorded",
        )
        process.kill()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
    assert process.returncode == -signal.SIGKILL
    receiver.let_go()  # its answer goes nowhere: the sender is dead
    return process.pid


def resumed_once_each(receiver: HoldingReceiver) -> None:
    """Each item delivered once, but the one in flight at the kill: twice, with the same key."""
    assert receiver.deliveries() == Counter({**dict.fromkeys(IDS, 1), HELD: 2})
    assert len(receiver.keys_of(HELD)) == 1 and None not in receiver.keys_of(HELD)


def test_automator_run_first_resumes_the_run_a_kill_left_running(
    workflows: Path, http_server: HTTPServer, history_url: str, cli
) -> None:
    receiver = HoldingReceiver(http_server)
    flow = write_flow(workflows, receiver.url)  # no on_crash: resume is the default
    pid = kill_mid_delivery(flow, history_url, receiver)

    result = cli("run", flow)
    assert result.exit_code == 0, result.stderr
    said = (
        f"resuming run 1 of notify, left running by a process that is gone (pid {pid} on host {socket.gethostname()})"
    )
    assert said in result.stderr
    assert "Run 1 of notify: succeeded" in result.stdout  # the resumed run, in its own id
    assert "Run 2 of notify: succeeded" in result.stdout  # then the new one
    resumed_once_each(receiver)

    history = History(history_url)
    assert [(r.id, r.status, r.delivered, r.skipped) for r in reversed(history.list_runs())] == [
        (1, "succeeded", 6, 0),
        (2, "succeeded", 0, 6),  # the new run found everything delivered
    ]
    assert [action for action, _ in DaemonStore(history).recoveries(1)] == ["detected", "resumed"]
    history.close()


def test_automator_run_finishes_a_killed_run_per_on_crash_fail(
    workflows: Path, http_server: HTTPServer, history_url: str, cli
) -> None:
    receiver = HoldingReceiver(http_server)
    flow = write_flow(workflows, receiver.url, on_crash="on_crash: fail")
    kill_mid_delivery(flow, history_url, receiver)

    result = cli("run", flow, "--json")
    assert result.exit_code == 0, result.stderr
    assert "finishing run 1 of notify: the run crashed (left running by a process that is gone" in result.stderr
    assert "not resumed: on_crash is fail" in result.stderr
    assert result.json()["id"] == 2  # --json prints the new run
    ledger = outcomes(history_url, 1)
    assert [ledger[i][0] for i in IDS] == ["delivered", "delivered"] + ["failed"] * 4
    assert all(ledger[i][1].startswith("not processed: the run crashed") for i in IDS[2:])
    # the new run delivered what the crashed one had not: the one in flight again, same key
    resumed_once_each(receiver)


def test_automator_resume_id_resumes_a_killed_run(
    workflows: Path, http_server: HTTPServer, history_url: str, cli
) -> None:
    receiver = HoldingReceiver(http_server, held=(HELD, "t4"))
    flow = write_flow(workflows, receiver.url)
    pid = kill_mid_delivery(flow, history_url, receiver)
    receiver.release["t4"].clear()  # held again, now in the resumed run
    # the resuming process will be younger than the run by more than the slack of the pid-reuse
    # check (1 s, plus up to 1 s the process start time may be off): only what it stamps when
    # it takes the run over says it owns it
    history = History(history_url)
    started = history.get_run(1).started_at
    history.close()
    wait_for(lambda: datetime.now(UTC) - started > timedelta(seconds=2.5), 5, "the run to be 2.5 s old")

    resumer = start_run(flow, history_url, "resume", "1", "--json")
    try:
        assert receiver.arrived["t4"].wait(30), "the resumed run never reached the receiver"
        # the resuming process is younger than the run: it still owns it, nobody marks it crashed
        listed = cli("runs", "--json")
        assert listed.exit_code == 0, listed.stderr
        assert [run["status"] for run in listed.json()] == ["running"]
        receiver.let_go()
        out, err = resumer.communicate(timeout=60)
    finally:
        receiver.let_go()
        if resumer.poll() is None:
            resumer.kill()
            resumer.wait(10)
    assert resumer.returncode == 0, err
    host = socket.gethostname()
    assert f"resuming run 1 of notify, left running by a process that is gone (pid {pid} on host {host})" in err
    shown = json.loads(out)
    assert (shown["id"], shown["status"], shown["items"]["delivered"]) == (1, "succeeded", 6)
    resumed_once_each(receiver)


def test_resume_refuses_unknown_finished_and_live_runs(
    workflows: Path, http_server: HTTPServer, history_url: str, cli
) -> None:
    receiver = HoldingReceiver(http_server)
    flow = write_flow(workflows, receiver.url)
    unknown = cli("resume", "99")
    assert unknown.exit_code == 1
    assert "error: no run with id 99" in unknown.stderr

    live = start_run(flow, history_url)
    try:
        assert receiver.arrived[HELD].wait(30), "the run never reached the receiver"
        refused = cli("resume", "1")
        assert refused.exit_code == 1
        assert f"error: run 1 of notify is running in a process that is still alive ({socket.gethostname()}:" in (
            refused.stderr
        )
        receiver.let_go()
        _out, err = live.communicate(timeout=60)
    finally:
        receiver.let_go()
        if live.poll() is None:
            live.kill()
            live.wait(10)
    assert live.returncode == 0, err
    finished = cli("resume", "1", "--json")
    assert finished.exit_code == 1
    assert "error: run 1 of notify is finished (succeeded): there is nothing to resume" in finished.stderr
    assert finished.stdout == ""
    assert receiver.deliveries() == Counter(IDS)  # refusing sent nothing


def test_a_daemon_resuming_an_old_run_skips_what_a_later_run_delivered(
    workflows: Path, http_server: HTTPServer, history_url: str, cli, start_daemon: Callable[..., object]
) -> None:
    receiver = HoldingReceiver(http_server)
    flow = write_flow(workflows, receiver.url)
    stuck = start_run(flow, history_url)
    try:
        assert receiver.arrived[HELD].wait(30), "the run never reached the receiver"
        stuck.send_signal(signal.SIGSTOP)  # a hung process: alive, so `automator run` leaves its run alone
        later = cli("run", flow)
        assert later.exit_code == 0, later.stderr
        assert "resuming" not in later.stderr
        assert outcomes(history_url, 2) == {
            **{i: ("skipped", f"already delivered (key {i!r}, run 1)") for i in IDS[:2]},
            **{i: ("delivered", None) for i in IDS[2:]},
        }
        stuck.kill()  # then the hung process is killed
    finally:
        if stuck.poll() is None:
            stuck.kill()
        stuck.wait(30)
        receiver.let_go()
    sent = receiver.deliveries()
    assert sent == Counter({**dict.fromkeys(IDS, 1), HELD: 2})

    start_daemon()  # finds run 1 orphaned and resumes it
    history = History(history_url)
    resumed = wait_for(
        lambda: (run := history.get_run(1)) is not None and run.status not in ("running", "crashed") and run,
        20,
        "the daemon to resume run 1",
    )
    assert resumed.status == "succeeded", resumed.error
    assert [action for action, _ in DaemonStore(history).recoveries(1)] == ["detected", "resumed"]
    assert outcomes(history_url, 1) == {
        **{i: ("delivered", None) for i in IDS[:2]},
        **{i: ("skipped", f"already delivered by run 2 (key {i!r})") for i in IDS[2:]},
    }
    assert receiver.deliveries() == sent  # the resumed run sent nothing again
    history.close()


def test_a_daemon_leaves_a_run_of_another_folder_to_the_daemon_that_has_the_workflow(
    workflows: Path, tmp_path: Path, http_server: HTTPServer, history_url: str, cli, start_daemon
) -> None:
    receiver = HoldingReceiver(http_server)
    elsewhere = tmp_path / "team-b" / "workflows"  # one daemon per folder, one history
    elsewhere.mkdir(parents=True)
    write_flow(elsewhere, receiver.url)
    team_b = DaemonProcess(elsewhere, history_url, tmp_path / "team-b.log")
    try:
        team_b.start()
        asked = cli("trigger", "notify", "--json")
        assert asked.exit_code == 0, asked.stderr
        run_id = asked.json()["run_id"]
        assert receiver.arrived[HELD].wait(30), "the run never reached the receiver"
        team_b.kill()
    finally:
        team_b.close()
    receiver.let_go()

    bystander = start_daemon()  # its folder has no notify.yaml
    bystander.wait_rounds(1, "the bystander's first rounds")
    history = History(history_url)
    run = history.get_run(run_id)
    assert (run.status, run.finished_at) == ("crashed", None)  # marked, not ended: not its workflow
    assert [action for action, _ in DaemonStore(history).recoveries(run_id)] == ["detected"]
    assert [outcome for outcome, _ in outcomes(history_url, run_id).values()].count("pending") == 4

    team_b = DaemonProcess(elsewhere, history_url, tmp_path / "team-b.log")
    try:
        team_b.start()  # the daemon that has the workflow resumes it
        resumed = wait_for(
            lambda: (run := history.get_run(run_id)) is not None and run.finished_at is not None and run,
            20,
            "team b's daemon to resume the run",
        )
    finally:
        team_b.close()
    assert resumed.status == "succeeded", resumed.error
    resumed_once_each(receiver)
    history.close()
