"""The routing, digest, split and paging examples an ops team copies from the docs and
workflows/ work as printed: a sample in, its deliveries and recorded outcomes out."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from automator import History
from tests.conftest import REPO, resume_crashed, run_until_killed

WORKFLOWS_DOC = REPO / "docs" / "workflows.md"
PLUGINS_DOC = REPO / "docs" / "plugins.md"


def code_block(doc: Path, language: str, containing: str) -> str:
    """The one code block of ``doc`` in ``language`` that contains ``containing``."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", doc.read_text(encoding="utf-8"), flags=re.M | re.S)
    [block] = [b for b in blocks if containing in b]
    return block


class Chat:
    """A chat webhook on loopback that keeps each post's Idempotency-Key and body."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, object]]] = []
        self.lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        with self.lock:
            self.posts.append((request.headers.get("Idempotency-Key", ""), request.get_json()))
        return Response("ok")


def tickets() -> list[dict[str, Any]]:
    lines = (REPO / "workflows" / "data" / "tickets.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def urgent(ticket: dict[str, Any]) -> bool:
    return ticket["priority"] in ("high", "urgent")


def team(ticket: dict[str, Any]) -> str:
    body, subject = str(ticket["body"]), str(ticket["subject"]).lower()
    return "finance" if "charge" in body or "refund" in body or "invoice" in subject else "support"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the shipped workflows' folder layout: the runs write out/ here, not in the repo."""
    folder = tmp_path / "project" / "workflows"
    (folder / "data").mkdir(parents=True)
    (tmp_path / "project" / "plugins").mkdir()
    shutil.copy(REPO / "workflows" / "data" / "tickets.jsonl", folder / "data" / "tickets.jsonl")
    return folder


# --- digests: workflows/urgent-digest.yaml -----------------------------------------------------


def test_the_urgent_digest_sample_posts_one_digest_per_team_and_files_every_ticket(
    project: Path, cli, history: History, httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = Chat()
    httpserver.expect_request("/hook", method="POST").respond_with_handler(chat)
    monkeypatch.setenv("AUTOMATOR_SECRET_CHAT_WEBHOOK", httpserver.url_for("/hook"))
    flow = project / "urgent-digest.yaml"
    shutil.copy(REPO / "workflows" / "urgent-digest.yaml", flow)

    dry = cli("run", flow, "--dry-run", "--json")
    result = cli("run", flow)
    again = cli("run", flow)

    assert result.exit_code == 0, result.stdout + result.stderr
    all_tickets = tickets()
    wanted = {
        name: sorted(t["id"] for t in all_tickets if urgent(t) and team(t) == name) for name in ("finance", "support")
    }
    # one post per team, listing exactly that team's urgent tickets
    texts = {str(body["text"]).split(" for ", 1)[1].split(":", 1)[0]: str(body["text"]) for _, body in chat.posts}
    assert len(chat.posts) == 2 and set(texts) == {"finance", "support"}
    for name, ids in wanted.items():
        assert texts[name].startswith(f"{len(ids)} urgent ticket(s) for {name}:\n")
        assert sorted(int(i) for i in re.findall(r"/tickets/(\d+)", texts[name])) == ids
    # every ticket in the file, with its team
    filed = [json.loads(line) for line in (project / "out" / "tickets.jsonl").read_text().splitlines()]
    assert sorted(t["id"] for t in filed) == sorted(t["id"] for t in all_tickets)
    assert all(t["team"] == team(t) for t in filed)
    # the history: the urgent ones delivered in their digest, the others by the file
    run = history.list_runs()[-1]
    items = {i.key: i for i in history.items(run.id)}
    for ticket in all_tickets:
        item = items[str(ticket["id"])]
        assert item.outcome == "delivered"
        if urgent(ticket):
            assert item.step_id == "chat" and re.fullmatch(r"in digest g-[0-9a-f]{32} \(\d+ items\)", item.reason or "")
        else:
            assert item.step_id == "archive" and item.reason is None
    # the dry run counted the same digests, and the next run posted nothing: no ticket is new
    deliveries = dry.json()["deliveries"]
    assert deliveries == [
        {"step": "archive", "items": len(all_tickets)},
        {"step": "chat", "items": sum(map(urgent, all_tickets)), "digests": 2},
    ]
    assert again.exit_code == 0 and len(chat.posts) == 2


def test_the_digest_shown_in_the_docs_is_the_samples() -> None:
    excerpt = code_block(WORKFLOWS_DOC, "yaml", "group:\n      by:")
    assert excerpt in (REPO / "workflows" / "urgent-digest.yaml").read_text(encoding="utf-8")


# --- routing: the when: example of docs/workflows.md ---------------------------------------------


def test_the_routing_example_sends_each_ticket_where_its_when_says(
    project: Path, cli, history: History, httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = Chat()
    httpserver.expect_request("/hook", method="POST").respond_with_handler(chat)
    monkeypatch.setenv("AUTOMATOR_SECRET_CHAT_WEBHOOK", httpserver.url_for("/hook"))
    flow = project / "route-tickets.yaml"
    flow.write_text(code_block(WORKFLOWS_DOC, "yaml", "name: route-tickets"), encoding="utf-8")

    result = cli("run", flow)

    assert result.exit_code == 0, result.stdout + result.stderr
    all_tickets = tickets()

    def billing(t: dict[str, Any]) -> bool:
        return "invoice" in str(t["subject"]).lower() or "charge" in str(t["body"])

    filed = [json.loads(line)["id"] for line in (project / "out" / "billing.jsonl").read_text().splitlines()]
    assert filed == [t["id"] for t in all_tickets if billing(t)]
    assert sorted(str(body["text"]) for _, body in chat.posts) == sorted(
        f"[{t['priority']}] {t['subject']}" for t in all_tickets if urgent(t)
    )
    items = {i.key: i for i in history.items(history.list_runs()[0].id)}
    for ticket in all_tickets:
        item = items[str(ticket["id"])]
        if urgent(ticket):
            assert (item.outcome, item.step_id) == ("delivered", "urgent")
        elif billing(ticket):
            assert (item.outcome, item.step_id) == ("delivered", "billing")
        else:
            reason = "no deliver step took it (when: false at billing, urgent)"
            assert (item.outcome, item.reason) == ("skipped", reason)


# --- splits: acme.attachments from docs/plugins.md, the workflow from docs/workflows.md ---------

MAILS = [
    {
        "id": "m1",
        "from": "ana@example.com",
        "attachments": [{"name": "invoice.pdf", "type": "application/pdf"}, {"name": "photo.png", "type": "image/png"}],
    },
    {"id": "m2", "from": "bo@example.com", "attachments": []},
    {"id": "m3", "from": "cy@example.com", "attachments": [{"name": "scan.png", "type": "image/png"}]},
]


def test_the_split_example_makes_one_item_per_attachment(project: Path, cli, history: History) -> None:
    # the docs' example splits with the standard template.transform (each:)
    (project / "mails.jsonl").write_text("".join(json.dumps(m) + "\n" for m in MAILS), encoding="utf-8")
    flow = project / "attachments.yaml"
    flow.write_text(code_block(WORKFLOWS_DOC, "yaml", 'each: "{{ item.attachments }}"'), encoding="utf-8")

    dry = cli("run", flow, "--dry-run", "--json")
    result = cli("run", flow)
    again = cli("run", flow)

    assert result.exit_code == 0, result.stdout + result.stderr
    images = [json.loads(line) for line in (project / "out" / "images.jsonl").read_text().splitlines()]
    assert [(i["mail"], i["file"]) for i in images] == [("m1", "photo.png"), ("m3", "scan.png")]
    first, second = sorted(history.list_runs(), key=lambda r: r.id)
    ended = {i.key: (i.outcome, i.reason) for i in history.items(first.id)}
    assert ended == {
        "m1": ("skipped", "split into 2 items (3-4) by split"),
        "m2": ("skipped", "split into no items by split"),
        "m3": ("skipped", "split into 1 item (5) by split"),
        "m1/invoice.pdf": ("skipped", "no deliver step took it (when: false at images)"),
        "m1/photo.png": ("delivered", None),
        "m3/scan.png": ("delivered", None),
    }
    assert first.fetched == 6 and dry.json()["fetched"] == 6
    # the mails are split again; the attachments delivered before are not delivered again
    assert again.exit_code == 0
    assert {i.key: i.outcome for i in history.items(second.id) if "/" in (i.key or "")} == {
        "m1/invoice.pdf": "skipped",
        "m1/photo.png": "skipped",
        "m3/scan.png": "skipped",
    }


# --- paging: acme.tickets (Checkpoint, resume_from) from docs/plugins.md -----------------------

CRASH_PLUGIN = """
import os, signal
from pathlib import Path
from automator import StepConfig, TransformStep, hookimpl

class CrashConfig(StepConfig):
    marker: str
    at_key: str

class Crash(TransformStep[CrashConfig]):
    name = "test.crash_once"

    def transform(self, item):
        marker = Path(self.config.marker)
        if item.key == self.config.at_key and not marker.exists():
            marker.write_text("crashed")
            os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no finally: a real crash
        return item.data

@hookimpl
def register_step_types(register):
    register(Crash)
"""

PAGES, PER_PAGE = 6, 5


def test_the_paging_example_goes_on_at_the_page_it_had_reached(
    project: Path, tmp_path: Path, history_url: str, httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []

    def page(request: Request) -> Response:
        assert request.headers.get("Authorization") == "Bearer t0ken-for-tickets"
        number = int(request.args["page"])
        asked.append(number)
        following = httpserver.url_for(f"/tickets?page={number + 1}") if number < PAGES else None
        body = {"tickets": [{"id": f"p{number}-{i}"} for i in range(PER_PAGE)], "next": following}
        return Response(json.dumps(body), content_type="application/json")

    httpserver.expect_request("/tickets").respond_with_handler(page)
    monkeypatch.setenv("AUTOMATOR_SECRET_TICKETS_TOKEN", "t0ken-for-tickets")
    plugins = project.parent / "plugins"
    (plugins / "acme_tickets.py").write_text(code_block(PLUGINS_DOC, "python", "class Tickets("), encoding="utf-8")
    (plugins / "crash.py").write_text(CRASH_PLUGIN, encoding="utf-8")
    flow = project / "tickets.yaml"
    flow.write_text(
        f"""
name: tickets
chunk_size: 5
chunks_in_flight: 1
steps:
  - id: tickets
    uses: acme.tickets
    with:
      url: "{httpserver.url_for("/tickets?page=1")}"
      token: "{{{{ secrets.TICKETS_TOKEN }}}}"
    key: "{{{{ item.id }}}}"
  - id: crash
    uses: test.crash_once
    with: {{marker: "{tmp_path / "crashed"}", at_key: p4-0}}
  - id: save
    uses: file.deliver
    with: {{path: out/tickets.jsonl}}
""",
        encoding="utf-8",
    )

    run_until_killed(flow, history_url)
    before = len(asked)
    history = History(history_url)
    run_id, result = resume_crashed(flow, plugins, history)

    assert result.status == "succeeded", result.error
    # the resumed fetch asked for the page after its last checkpoint, never for pages 1-3 again
    assert asked[:4] == [1, 2, 3, 4] and min(asked[before:]) >= 4
    everything = sorted(f"p{p}-{i}" for p in range(1, PAGES + 1) for i in range(PER_PAGE))
    items = history.items(run_id)
    assert sorted(i.key or "" for i in items) == everything and {i.outcome for i in items} == {"delivered"}
    saved = [json.loads(line)["id"] for line in (project / "out" / "tickets.jsonl").read_text().splitlines()]
    assert sorted(saved) == everything
    history.close()


# --- splitting: workflows/mail-attachments.yaml (offline, runs as shipped) -----------------------


def test_the_attachments_sample_splits_each_mail(tmp_path: Path, cli, history: History) -> None:
    project = tmp_path / "workflows"
    shutil.copytree(REPO / "workflows" / "data", project / "data")
    flow = project / "mail-attachments.yaml"
    shutil.copy(REPO / "workflows" / "mail-attachments.yaml", flow)

    result = cli("run", flow)
    assert result.exit_code == 0, result.stdout + result.stderr
    images = [json.loads(line) for line in (project / "out" / "attachment-images.jsonl").read_text().splitlines()]
    assert sorted((i["mail"], i["file"]) for i in images) == [("mail-1", "parcel.png"), ("mail-3", "screen.png")]
    run = history.list_runs()[0]
    ended = {i.key: i.outcome for i in history.items(run.id)}
    assert ended == {
        "mail-1": "skipped",  # split into its attachments
        "mail-2": "skipped",  # no attachments: split into no items
        "mail-3": "skipped",
        "mail-1/parcel.png": "delivered",
        "mail-1/receipt.pdf": "skipped",  # not an image: the deliver step's when: is false
        "mail-3/screen.png": "delivered",
    }
