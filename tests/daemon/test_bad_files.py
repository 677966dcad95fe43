"""One bad workflow file only ever costs that file: the daemon logs it and runs the others.

Files built to hurt a YAML loader (an alias bomb, nesting thousands of levels deep, NUL
bytes, bytes that are not UTF-8) or the scheduler (a time in year 9999), present when the daemon starts and dropped in while it
runs: the good workflow keeps firing, hot reload keeps working, /healthz stays healthy,
and SIGTERM stops the daemon at once.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from automator.history.store import History
from tests.daemon.conftest import wait_for

GOOD = """
name: good
schedule: {{every: 1s}}
steps:
  - id: read
    uses: file.fetch
    with: {{path: items.jsonl}}
  - id: shape
    uses: template.transform
    with: {{mapping: {{label: "{label}"}}}}
"""


def alias_bomb() -> bytes:
    """About 1 KB of YAML that expands to 9**12 values."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 13):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return ("\n".join(lines) + "\nsteps: *a12\n").encode()


BAD_FILES: dict[str, bytes] = {
    "bomb.yaml": alias_bomb(),
    "deep.yaml": b"name: deep\nsteps: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "nul.yaml": b"name: nul\x00\nsteps: []\n",
    "latin1.yaml": "name: caf\u00e9\nsteps: []\n".encode("latin-1"),
    # valid YAML, but a time the scheduler would overflow on (it ended the daemon at start)
    "year-9999.yaml": GOOD.format(label="x")
    .replace("name: good", "name: late")
    .replace("{every: 1s}", "{at: 9999-12-31T23:00:00, timezone: America/New_York}")
    .encode(),
}


def _errors_for(daemon, path: Path) -> list[str]:
    return [
        problem
        for line in daemon.logs()
        if line.get("level") == "error" and line.get("file") == str(path)
        for problem in line.get("problems", [])
    ]


def test_bad_files_at_start_and_dropped_in_cost_only_themselves(
    workflows: Path, write, start_daemon, read_history: History
) -> None:
    (workflows / "items.jsonl").write_text('{"id": 1}\n')
    for name, content in BAD_FILES.items():
        (workflows / f"start-{name}").write_bytes(content)
    write("good.yaml", GOOD.format(label="one"))

    daemon = start_daemon()
    wait_for(lambda: read_history.list_runs(workflow="good"), 15, "a run of the good workflow")
    for name in BAD_FILES:
        path = workflows / f"start-{name}"
        problems = wait_for(lambda path=path: _errors_for(daemon, path), 10, f"the error for {path.name}")
        assert all(p.startswith(f"{path}:") for p in problems), problems

    started = time.monotonic()
    for name, content in BAD_FILES.items():
        (workflows / f"later-{name}").write_bytes(content)
    for name in BAD_FILES:
        path = workflows / f"later-{name}"
        problems = wait_for(lambda path=path: _errors_for(daemon, path), 10, f"the error for {path.name}")
        assert all(p.startswith(f"{path}:") for p in problems), problems
    assert time.monotonic() - started < 10  # refused at once, not after expanding the bomb

    # housekeeping lives on: an edit of the good file is picked up, and it keeps firing
    write("good.yaml", GOOD.format(label="two"))
    run = wait_for(
        lambda: [
            r
            for r in read_history.list_runs(workflow="good", limit=1000)
            if r.status == "succeeded" and read_history.items(r.id)[0].result == {"label": "two"}
        ],
        10,
        "a run of the edited good workflow",
    )[0]
    assert run.status == "succeeded"
    health = httpx.get(f"{daemon.base}/healthz", timeout=5)
    assert health.status_code == 200, health.text
    assert health.json()["invalid_files"] == 2 * len(BAD_FILES)
    assert "Traceback" not in daemon.log_text()

    stopping = time.monotonic()
    assert daemon.stop(timeout=15) == 0
    assert time.monotonic() - stopping < 10
