"""Digests: a deliver step with group: sends one message for many items, once, even across a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from werkzeug import Request, Response

from automator import History

TICKETS = [{"id": i, "team": ["finance", "support"][i % 2], "urgent": i % 3 == 0} for i in range(250)]


def _flow(tmp_path: Path, url: str, group: str, when: str = "", concurrency: int = 4) -> Path:
    folder = tmp_path / "workflows"
    folder.mkdir(exist_ok=True)
    (folder / "tickets.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TICKETS))
    flow = folder / "digest.yaml"
    flow.write_text(
        textwrap.dedent(
            f"""
            name: digest
            chunk_size: 20
            steps:
              - id: tickets
                uses: file.fetch
                with: {{path: tickets.jsonl}}
                key: "{{{{ item.id }}}}"
              - id: post
                uses: webhook.deliver
                concurrency: {concurrency}
                {when}
                group: {group}
                with:
                  url: "{url}"
                  body:
                    team: "{{{{ group }}}}"
                    ids: "{{{{ items | map(attribute='id') | list }}}}"
                    text: "{{{{ item.count }}}} tickets"
            """
        )
    )
    return flow


class Receiver:
    """A chat webhook that keeps each post's body and Idempotency-Key."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, object]]] = []
        self.lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        with self.lock:
            self.posts.append((request.headers.get("Idempotency-Key", ""), request.get_json()))
        return Response("ok")


def test_items_go_in_groups_by_team_each_with_the_groups_outcome(
    tmp_path: Path, cli, history: History, httpserver
) -> None:
    receiver = Receiver()
    httpserver.expect_request("/chat", method="POST").respond_with_handler(receiver)
    flow = _flow(
        tmp_path, httpserver.url_for("/chat"), '{size: 30, by: "{{ item.team }}"}', 'when: "{{ item.urgent }}"'
    )
    result = cli("run", flow)
    assert result.exit_code == 0, result.stdout + result.stderr
    urgent = [t for t in TICKETS if t["urgent"]]
    bodies = [body for _, body in receiver.posts]
    # every urgent ticket in exactly one post, of its own team; at most 30 per post
    posted = sorted(i for body in bodies for i in body["ids"])  # type: ignore[attr-defined]
    assert posted == [t["id"] for t in urgent]
    for body in bodies:
        assert all(TICKETS[i]["team"] == body["team"] for i in body["ids"])  # type: ignore[attr-defined]
        assert len(body["ids"]) <= 30 and body["text"] == f"{len(body['ids'])} tickets"  # type: ignore[arg-type]
    # full groups while there were enough items: 42 urgent per team, so 30 + 12 each
    assert sorted(len(b["ids"]) for b in bodies) == [12, 12, 30, 30]  # type: ignore[arg-type]
    assert len({key for key, _ in receiver.posts}) == len(bodies)
    run = history.list_runs()[0]
    items = {i.key: i for i in history.items(run.id)}
    for t in TICKETS:
        item = items[str(t["id"])]
        if t["urgent"]:
            assert item.outcome == "delivered" and item.reason.startswith("in digest g-")
        else:
            assert item.outcome == "skipped"


def test_group_size_defaults_to_100(tmp_path: Path, cli, httpserver) -> None:
    receiver = Receiver()
    httpserver.expect_request("/chat", method="POST").respond_with_handler(receiver)
    flow = _flow(tmp_path, httpserver.url_for("/chat"), "{}")
    assert cli("run", flow).exit_code == 0
    assert sorted(len(body["ids"]) for _, body in receiver.posts) == [50, 100, 100]  # type: ignore[arg-type]
    assert all(body["team"] is None for _, body in receiver.posts)  # no by: one group value, null


def test_the_dry_run_counts_digests(tmp_path: Path, cli, httpserver) -> None:
    flow = _flow(
        tmp_path, httpserver.url_for("/chat"), '{size: 30, by: "{{ item.team }}"}', 'when: "{{ item.urgent }}"'
    )
    result = cli("run", flow, "--dry-run", "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    found = result.json()
    assert found["deliveries"] == [{"step": "post", "items": 84, "digests": 4}]
    assert found["outcomes"]["skipped"] == 166


def test_a_digest_in_flight_at_a_crash_is_sent_again_with_the_same_key(
    tmp_path: Path, history_url: str, httpserver
) -> None:
    receiver = Receiver()
    # one digest in flight at a time: the kill finds exactly one
    flow = _flow(tmp_path, httpserver.url_for("/chat"), "{size: 40}", concurrency=1)
    env = {**os.environ, "AUTOMATOR_DATABASE_URL": history_url}
    process = subprocess.Popen(
        [sys.executable, "-m", "automator.cli.main", "run", str(flow)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def crash_on_third(request: Request) -> Response:
        receiver(request)
        if len(receiver.posts) == 3:
            os.kill(process.pid, signal.SIGKILL)  # the sender dies before it hears the answer
        return Response("ok")

    httpserver.expect_request("/chat", method="POST").respond_with_handler(crash_on_third)
    process.wait(timeout=60)
    assert process.returncode == -9
    before = list(receiver.posts)
    resumed = subprocess.run(
        [sys.executable, "-m", "automator.cli.main", "run", str(flow)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resum" in (resumed.stdout + resumed.stderr).lower()
    after = receiver.posts[len(before) :]
    # the third digest was in flight: sent again with its key and the same items; the first
    # two are never sent again; every ticket is in one digest (the receiver dedupes by key)
    assert len(before) == 3
    third_key, third_body = before[2]
    assert (third_key, third_body) in after
    assert not {key for key, _ in before[:2]} & {key for key, _ in after}
    unique = {key: body for key, body in receiver.posts}
    ids = sorted(i for body in unique.values() for i in body["ids"])  # type: ignore[attr-defined]
    assert ids == list(range(250))
    history = History(history_url)
    crashed, new = sorted(history.list_runs(), key=lambda r: r.id)
    # `automator run` finished the crashed run first, then ran anew: nothing left to send
    assert crashed.status == "succeeded" and {i.outcome for i in history.items(crashed.id)} == {"delivered"}
    assert {i.outcome for i in history.items(new.id)} == {"skipped"}
    history.close()
