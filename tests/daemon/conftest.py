"""The real daemon as a subprocess, a webhook receiver on loopback, and small waiting helpers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from automator.history.store import History


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll until ``condition()`` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DaemonProcess:
    """``automator daemon`` in a subprocess, logging JSON lines to a file."""

    def __init__(
        self, workflows: Path, database_url: str, log_path: Path, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.workflows = workflows
        self.database_url = database_url
        self.log_path = log_path
        self.extra = extra
        self.env = env or {}  # on top of this process's environment (a model server's address, say)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DaemonProcess:
        env = {**os.environ, **self.env, "AUTOMATOR_DATABASE_URL": self.database_url}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "automator.cli.main",
                    "daemon",
                    "--workflows",
                    str(self.workflows),
                    "--http",
                    f"127.0.0.1:{self.port}",
                    "--log-format",
                    "json",
                    *self.extra,
                ],
                stdout=log,
                stderr=log,
                env=env,
            )
        wait_for(self.healthy, 20, "the daemon's /healthz")
        return self

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.log_text()}")
        try:
            return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def housekeeping_rounds(self) -> float:
        text = httpx.get(f"{self.base}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            if family.name == "automator_housekeeping_rounds":
                return float(family.samples[0].value)
        raise AssertionError("the daemon's /metrics has no automator_housekeeping_rounds")

    def wait_rounds(self, rounds: int, what: str) -> None:
        """Let the daemon's own loop go round ``rounds`` more times: time for something to (not) happen.

        A negative check ("it did not fire again") needs time to pass; waiting on the
        daemon's rounds ties that time to the daemon's work, not to a guess in seconds.
        """
        target = self.housekeeping_rounds() + rounds
        wait_for(lambda: self.housekeeping_rounds() >= target, 10 + 2 * rounds, what)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                lines.append({"message": line, "level": "raw"})
        return lines

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def workflows(tmp_path: Path) -> Path:
    folder = tmp_path / "project" / "workflows"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def write(workflows: Path) -> Callable[..., Path]:
    def write(name: str, text: str) -> Path:
        path = workflows / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write


@pytest.fixture
def start_daemon(workflows: Path, history_url: str, tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(*extra: str) -> DaemonProcess:
        daemon = DaemonProcess(workflows, history_url, tmp_path / "daemon.log", *extra)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.close()


@pytest.fixture
def read_history(history_url: str) -> Iterator[History]:
    store = History(history_url)
    yield store
    store.close()


@dataclass
class Post:
    """One request as the receiver saw it: a kill test tells from these what was in flight at the kill."""

    key: str | None
    body: Any
    arrived: float  # time.monotonic()
    answered: float | None = None


class Receiver:
    """A webhook receiver that dedupes by idempotency key, as a careful one does."""

    def __init__(self, server: HTTPServer, delay: float = 0.0, *, hold: bool = False) -> None:
        self.server = server
        self.delay = delay
        # hold: answer nothing until the test sets ``release`` (a run that stays busy on cue)
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.requests: list[tuple[str | None, Any]] = []
        self.applied: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._handling = 0
        self.posts: list[Post] = []  # every request from its arrival on, answered or not
        self._arrived = threading.Condition(self._lock)
        server.expect_request("/hook").respond_with_handler(self._handle)

    @property
    def url(self) -> str:
        return self.server.url_for("/hook")

    def _handle(self, request: Request) -> Response:
        post = Post(request.headers.get("Idempotency-Key"), request.get_json(silent=True), time.monotonic())
        with self._lock:
            self._handling += 1
            self.posts.append(post)
            self._arrived.notify_all()
        try:
            if self.delay:
                time.sleep(self.delay)  # a slow receiver (server side), not a wait in a test
            self.release.wait(30)
            key = request.headers.get("Idempotency-Key")
            body = request.get_json(silent=True)
            with self._lock:
                self.requests.append((key, body))
                if key is not None:
                    self.applied.setdefault(key, body)
                post.answered = time.monotonic()
            return Response("ok")
        finally:
            with self._lock:
                self._handling -= 1

    def idle(self) -> bool:
        """No request is being handled: one in flight when its sender died has been counted."""
        with self._lock:
            return self._handling == 0

    def wait_idle(self) -> None:
        wait_for(self.idle, 10, "the receiver to finish the requests in flight")

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def wait_posts(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` requests have arrived (answered or not)."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.posts) >= count, timeout):
                raise AssertionError(f"timed out after {timeout}s waiting for {count} requests to arrive")


@pytest.fixture
def http_server() -> Iterator[HTTPServer]:
    server = HTTPServer(host="127.0.0.1", threaded=True)
    server.start()
    yield server
    server.clear()
    if server.is_running():
        server.stop()
