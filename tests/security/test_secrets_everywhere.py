"""Secrets never appear, in any encoding, in anything automator writes.

The scenarios run real workflows against real servers on loopback (pytest-httpserver, the
fake OpenAI server) with secrets that hold quotes, backslashes, spaces, unicode and
URL-special characters: in headers, bodies, URLs (path and query), error replies that echo
them back, model answers that quote them, and a template error that names one. Then every
byte written is scanned: the SQLite database, its -wal and its dump, the log file, stdout
and stderr of every command (``run`` with ``-v`` and ``--json``, ``runs``, ``runs show``,
``costs``, ``export finetune``, ``validate``, ``trigger``, the daemon and its HTTP
endpoints), and every file under the scenario's folder. There is one test per scenario and
encoding, so a failure says which encoding leaked where.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from automator.cli.main import main
from automator.engine.context import Redactor
from automator.history.store import History
from tests.daemon.conftest import DaemonProcess, wait_for
from tests.llm.fake_openai import FakeOpenAI

# in URLs, bodies, templates and model prompts
SECRET = 's3cr"e\\t p@ss/wörd?&=%+'
# HTTP header values are ASCII; the rest of the trouble is there
HEADER_SECRET = 'tok"en\\ 9f8e p@ss/wd?&=%+'
API_KEY = "sk-test-5ecre7-a1b2c3d4e5f6a7b8c9d0"


def _httpx_url_form(value: str) -> str:
    """The secret as httpx writes it into a URL it sends (and names in its errors)."""
    return str(httpx.URL("http://example.com/?q=" + value)).split("?q=", 1)[1]


def encodings(value: str) -> dict[str, str]:
    """Every form a secret takes in text that we know of, by name."""
    url = _httpx_url_form(value)
    return {
        "raw": value,
        "JSON-escaped": json.dumps(value, ensure_ascii=False)[1:-1],
        "JSON-escaped (ASCII)": json.dumps(value)[1:-1],
        "JSON-escaped twice": json.dumps(json.dumps(value, ensure_ascii=False)[1:-1], ensure_ascii=False)[1:-1],
        "URL-encoded": quote(value, safe=""),
        "URL-encoded (safe /)": quote(value, safe="/"),
        "form-encoded": quote_plus(value, safe=""),
        "form-encoded (safe /)": quote_plus(value, safe="/"),
        "in a URL httpx sends": url,
        "in a URL as werkzeug shows it": value.replace(" ", "%20"),
        "percent-encoded, lower-case hex": "".join(f"%{byte:02x}" for byte in value.encode()),
        "in a URL httpx sends, JSON-escaped": json.dumps(url, ensure_ascii=False)[1:-1],
        "HTML-escaped": html.escape(value),
        "repr-escaped": repr(value)[1:-1],
        "repr-escaped, JSON-escaped": json.dumps(repr(value)[1:-1], ensure_ascii=False)[1:-1],
        "ascii()-escaped": ascii(value)[1:-1],
        "base64": base64.b64encode(value.encode()).decode().rstrip("="),
        # a message cut short (a reply quoted up to 200 characters) must not keep half a secret
        "first 8 characters": value[:8],
        "first 8 characters, JSON-escaped": json.dumps(value[:8], ensure_ascii=False)[1:-1],
    }


LEAK_FORMS = [
    (f"{name} {label}", form)
    for name, value in (("SECRET", SECRET), ("HEADER_SECRET", HEADER_SECRET), ("API_KEY", API_KEY))
    for label, form in encodings(value).items()
]
ENCODING_IDS = [label for label, _ in LEAK_FORMS]


def leaks(written: dict[str, bytes], form: str) -> list[str]:
    needle = form.encode("utf-8")
    return [where for where, data in written.items() if needle in data]


# --- what the scenarios share --------------------------------------------------------------

AUDIT_PLUGIN = '''
"""acme.audit: a third-party deliver step that logs what it does, as plugin authors do."""

import logging
from pathlib import Path
from typing import Any

from automator import DeliverStep, Item, StepConfig, hookimpl

log = logging.getLogger("acme.audit")


class AuditConfig(StepConfig):
    url: str
    token: str


class Audit(DeliverStep[AuditConfig]):
    name = "acme.audit"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.url = ""
        self.count = 0

    def deliver(self, item: Item) -> None:
        self.url = self.render_text(self.config.url, item)
        self.count += 1
        token = self.render_text(self.config.token, item)
        log.warning("audit: item %s for %s", item.seq, self.url, extra={"audit_url": self.url})
        log.info("audit: signing with %s", token)  # debugging left in, as it happens
        try:
            raise ValueError(f"audit endpoint {self.url!r} is read-only")
        except ValueError:
            log.exception("audit: could not post item %s", item.seq)

    def summary(self) -> str | None:
        return f"audited {self.count} items for {self.url}"


@hookimpl
def register_step_types(register: Any) -> None:
    register(Audit)


# a listener that keeps every event it is handed (in a file under the scanned folder)
EVENTS = Path(__file__).with_name("events.log")


def _keep(event: Any) -> None:
    with EVENTS.open("a", encoding="utf-8") as out:
        out.write(repr(event) + "\\n")


@hookimpl
def step_finished(event: Any) -> None:
    _keep(event)


@hookimpl
def item_outcome(event: Any) -> None:
    _keep(event)


@hookimpl
def run_finished(event: Any) -> None:
    _keep(event)
'''


@dataclass
class Project:
    """A scenario's folder: workflows, plugins, history, outputs; and what was written."""

    root: Path
    env: dict[str, str]
    written: dict[str, bytes] = field(default_factory=dict)

    @property
    def workflows(self) -> Path:
        return self.root / "project" / "workflows"

    @property
    def database(self) -> Path:
        return self.root / "history.db"

    def write_workflow(self, text: str, name: str = "flow.yaml") -> Path:
        path = self.workflows / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    def console(self, *args: str | Path, name: str) -> subprocess.CompletedProcess[bytes]:
        """The real console script in a subprocess: its stdout and stderr are kept for the scan."""
        done = subprocess.run(
            [sys.executable, "-m", "automator.cli.main", *map(str, args)],
            capture_output=True,
            env=self.env,
            cwd=self.root,
            timeout=120,
            check=False,
        )
        self.written[f"{name}: stdout"] = done.stdout
        self.written[f"{name}: stderr"] = done.stderr
        return done

    def cli(self, *args: str | Path, name: str) -> int:
        """``automator ARGS`` in this process (faster), stdout and stderr kept for the scan."""
        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as patch:
            for key, value in self.env.items():
                patch.setenv(key, value)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([str(a) for a in args])
        self.written[f"{name}: stdout"] = out.getvalue().encode()
        self.written[f"{name}: stderr"] = err.getvalue().encode()
        return code

    def every_command(self, flow: Path, run_id: int) -> None:
        """The read-side commands, over the history the runs left."""
        self.cli("validate", flow, name="validate")
        self.cli("runs", name="runs")
        self.cli("runs", "--json", name="runs --json")
        self.cli("runs", "show", str(run_id), name="runs show")
        self.cli("runs", "show", str(run_id), "--items", name="runs show --items")
        self.cli("runs", "show", str(run_id), "--json", name="runs show --json")
        self.cli("costs", "--json", name="costs --json")

    def scan_files(self) -> dict[str, bytes]:
        """Every file under the scenario's folder, and the history's dump."""
        found = dict(self.written)
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                found[f"file {path.relative_to(self.root)}"] = path.read_bytes()
        if self.database.exists():
            with contextlib.closing(sqlite3.connect(self.database)) as conn:
                found["history iterdump"] = "\n".join(conn.iterdump()).encode()
        return found


def new_project(root: Path, openai: FakeOpenAI) -> Project:
    (root / "project" / "workflows").mkdir(parents=True)
    (root / "project" / "plugins").mkdir()
    (root / "project" / "plugins" / "acme_audit.py").write_text(AUDIT_PLUGIN, encoding="utf-8")
    env = {
        **os.environ,
        "AUTOMATOR_DATABASE_URL": f"sqlite:///{root / 'history.db'}",
        "AUTOMATOR_SECRET_TOKEN": SECRET,
        "AUTOMATOR_SECRET_HEADER_TOKEN": HEADER_SECRET,
        "OPENAI_BASE_URL": openai.base_url,
        "OPENAI_API_KEY": API_KEY,
        "COLUMNS": "200",
    }
    return Project(root, env)


@dataclass
class Seen:
    """What the servers received: proof that each secret really was used."""

    requests: list[str] = field(default_factory=list)

    def record(self, request: Request) -> None:
        headers = json.dumps(dict(request.headers), ensure_ascii=False)
        self.requests.append(f"{request.full_path} {headers} {request.get_data(as_text=True)}")

    def got(self, value: str) -> bool:
        forms = encodings(value)
        return any(
            forms["raw"] in r or forms["in a URL httpx sends"] in r or forms["JSON-escaped"] in r for r in self.requests
        )


def echo(request: Request) -> str:
    """What a careless server puts in an error reply: the URL, the headers and the body it got."""
    return (
        f"rejected {request.url} (path {request.path}, query {dict(request.args)}) "
        f"headers {dict(request.headers)} body {request.get_data(as_text=True)}"
    )


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[HTTPServer, FakeOpenAI]]:
    server = HTTPServer(host="127.0.0.1", threaded=True)
    server.start()
    openai = FakeOpenAI().start()
    yield server, openai
    server.clear()
    server.stop()
    openai.stop()


# --- the scenarios -------------------------------------------------------------------------

RETRY = "defaults: {retry: {attempts: 2, backoff: 10ms, max_backoff: 10ms}}"


def _latest_run(project: Project) -> int:
    history = History(project.env["AUTOMATOR_DATABASE_URL"])
    try:
        return history.list_runs()[0].id
    finally:
        history.close()


def successful_run(project: Project, server: HTTPServer, openai: FakeOpenAI) -> None:
    """Fetch with a secret header and URL, a model answer quoting it, webhook, file and a plugin."""
    seen = Seen()
    tickets = {"tickets": [{"id": 1, "text": f"printer on fire, my token is {SECRET}"}, {"id": 2, "text": "refund"}]}

    def items(request: Request) -> Response:
        seen.record(request)
        return Response(json.dumps(tickets), content_type="application/json")

    def hook(request: Request) -> Response:
        seen.record(request)
        return Response("ok")

    server.expect_request(re.compile("^/ok/items")).respond_with_handler(items)
    server.expect_request(re.compile("^/ok/hook")).respond_with_handler(hook)
    base = server.url_for("/ok")
    flow = project.write_workflow(
        f"""
        name: tickets
        {RETRY}
        steps:
          - id: tickets
            uses: http.fetch
            with:
              url: "{base}/items?token={{{{ secrets.TOKEN | urlencode }}}}"
              headers: {{Authorization: "Bearer {{{{ secrets.HEADER_TOKEN }}}}"}}
              items: tickets
          - id: note
            uses: template.transform
            with:
              mapping: {{text: "{{{{ item.text }}}}", note: "sent with {{{{ secrets.TOKEN }}}}"}}
          - id: classify
            uses: openai.transform
            with:
              instructions: Summarise the ticket in a few words.
              input: "{{{{ secrets.TOKEN }}}} {{{{ item.text }}}}"
              output: {{schema: {{summary: string}}}}
              store_prompts: true
          - id: audit
            uses: acme.audit
            with: {{url: "{base}/audit/{{{{ secrets.TOKEN | urlencode }}}}", token: "{{{{ secrets.TOKEN }}}}"}}
          - id: notify
            uses: webhook.deliver
            with:
              url: "{base}/hook/{{{{ secrets.TOKEN | urlencode }}}}?key={{{{ secrets.TOKEN | urlencode }}}}"
              headers: {{X-Token: "{{{{ secrets.HEADER_TOKEN }}}}"}}
              body: {{text: "{{{{ item.summary }}}}", token: "{{{{ secrets.TOKEN }}}}"}}
          - id: out
            uses: file.deliver
            with: {{path: "out/tickets.jsonl"}}
        """
    )
    verbose = project.console("-v", "run", flow, name="run -v")
    assert verbose.returncode == 0, verbose.stderr.decode()
    as_json = project.console("run", "--json", flow, name="run --json")
    assert as_json.returncode == 0, as_json.stderr.decode()
    assert b"audit: signing with ***" in verbose.stderr  # the plugin's log line is there, cleaned
    outputs = [o["step"] for o in json.loads(as_json.stdout)["outputs"]]
    assert "audit" in outputs and "out" in outputs  # the summaries that quote secrets are shown
    # the secrets went where the workflow sent them, and the model was asked with one
    assert seen.got(SECRET) and seen.got(HEADER_SECRET)
    assert any(SECRET in m["content"] for r in openai.completions for m in r["body"]["messages"])
    assert (project.workflows / "out" / "tickets.jsonl").exists()
    project.every_command(flow, _latest_run(project))
    exported = project.root / "finetune.jsonl"
    assert project.cli("export", "finetune", "--workflow", "tickets", "--step", "classify", name="export") == 0
    assert (
        project.cli(
            "export", "finetune", "--workflow", "tickets", "--step", "classify", "-o", exported, name="export -o"
        )
        == 0
    )


def webhook_answers_500(project: Project, server: HTTPServer, openai: FakeOpenAI) -> None:
    """The webhook answers 500, echoing the URL, headers and body it got; retried, then failed."""
    seen = Seen()

    def hook(request: Request) -> Response:
        seen.record(request)
        return Response(echo(request), status=500)

    server.expect_request(re.compile("^/h500/hook")).respond_with_handler(hook)
    base = server.url_for("/h500")
    project.workflows.joinpath("items.jsonl").write_text('{"id": 1}\n{"id": 2}\n', encoding="utf-8")
    flow = project.write_workflow(
        f"""
        name: notify
        {RETRY}
        steps:
          - id: items
            uses: file.fetch
            with: {{path: items.jsonl}}
          - id: notify
            uses: webhook.deliver
            with:
              url: "{base}/hook/{{{{ secrets.TOKEN | urlencode }}}}?key={{{{ secrets.TOKEN | urlencode }}}}"
              headers: {{Authorization: "Bearer {{{{ secrets.HEADER_TOKEN }}}}"}}
              body: {{token: "{{{{ secrets.TOKEN }}}}", id: "{{{{ item.id }}}}"}}
        """
    )
    verbose = project.console("-v", "run", flow, name="run -v")
    assert verbose.returncode == 1, verbose.stderr.decode()
    assert project.console("run", "--json", flow, name="run --json").returncode == 1
    assert seen.got(SECRET) and seen.got(HEADER_SECRET)
    assert b"answered 500" in project.written["run --json: stdout"]
    project.every_command(flow, _latest_run(project))


def fetch_answers_401(project: Project, server: HTTPServer, openai: FakeOpenAI) -> None:
    """The fetch's server answers 401, quoting the Authorization header (as JSON) and the URL."""
    seen = Seen()

    def items(request: Request) -> Response:
        seen.record(request)
        reply = {"error": "invalid token", "got": request.headers.get("Authorization"), "detail": echo(request)}
        return Response(json.dumps(reply), status=401, content_type="application/json")

    server.expect_request(re.compile("^/f401/items")).respond_with_handler(items)
    base = server.url_for("/f401")
    flow = project.write_workflow(
        f"""
        name: fetch-denied
        {RETRY}
        steps:
          - id: tickets
            uses: http.fetch
            with:
              url: "{base}/items/{{{{ secrets.TOKEN | urlencode }}}}?token={{{{ secrets.TOKEN | urlencode }}}}"
              headers: {{Authorization: "Bearer {{{{ secrets.HEADER_TOKEN }}}}"}}
          - id: out
            uses: file.deliver
            with: {{path: out.jsonl}}
        """
    )
    verbose = project.console("-v", "run", flow, name="run -v")
    assert verbose.returncode == 1, verbose.stderr.decode()
    assert project.console("run", "--json", flow, name="run --json").returncode == 1
    assert seen.got(SECRET) and seen.got(HEADER_SECRET)
    assert b"answered 401" in project.written["run --json: stdout"]
    dry_run = project.console("run", "--dry-run", flow, name="run --dry-run")
    assert b"answered 401" in dry_run.stderr, dry_run.stderr.decode()
    project.every_command(flow, _latest_run(project))


def template_error(project: Project, server: HTTPServer, openai: FakeOpenAI) -> None:
    """A template fails with the secret in its message (Jinja quotes the missing key's repr)."""
    project.workflows.joinpath("items.jsonl").write_text('{"id": 1}\n', encoding="utf-8")
    flow = project.write_workflow(
        """
        name: broken-template
        steps:
          - id: items
            uses: file.fetch
            with: {path: items.jsonl}
          - id: shape
            uses: template.transform
            with:
              mapping: {value: "{{ item[secrets.TOKEN] }}", other: "{{ item[secrets.HEADER_TOKEN] }}"}
          - id: out
            uses: file.deliver
            with: {path: out.jsonl}
        """
    )
    verbose = project.console("-v", "run", flow, name="run -v")
    assert verbose.returncode == 1, verbose.stderr.decode()
    assert project.console("run", "--json", flow, name="run --json").returncode == 1
    assert b"has no attribute" in project.written["run --json: stdout"]  # the error is there, redacted
    project.every_command(flow, _latest_run(project))


def model_answer(project: Project, server: HTTPServer, openai: FakeOpenAI) -> None:
    """A model step (no store_prompts, the cache on) whose answers quote the secret, into a file."""
    project.workflows.joinpath("items.jsonl").write_text(
        "".join(json.dumps({"id": i, "text": f"ticket {i}"}) + "\n" for i in range(3)), encoding="utf-8"
    )
    flow = project.write_workflow(
        """
        name: model-quotes
        steps:
          - id: items
            uses: file.fetch
            with: {path: items.jsonl}
          - id: classify
            uses: openai.transform
            with:
              instructions: Repeat the credentials.
              input: "{{ secrets.TOKEN }} {{ item.text }}"
          - id: out
            uses: file.deliver
            with: {path: out.csv}
        """
    )
    verbose = project.console("-v", "run", flow, name="run -v")
    assert verbose.returncode == 0, verbose.stderr.decode()
    # the second run answers from the response cache
    assert project.console("run", "--json", flow, name="run --json").returncode == 0
    assert any(SECRET in m["content"] for r in openai.completions for m in r["body"]["messages"])
    project.every_command(flow, _latest_run(project))


def daemon(project: Project, server: HTTPServer, openai: FakeOpenAI) -> None:
    """The daemon runs a workflow whose webhook answers 400 echoing it, started by `automator trigger`."""
    seen = Seen()

    def hook(request: Request) -> Response:
        seen.record(request)
        return Response(echo(request), status=400)

    server.expect_request(re.compile("^/daemon/hook")).respond_with_handler(hook)
    base = server.url_for("/daemon")
    project.workflows.joinpath("items.jsonl").write_text('{"id": 1}\n', encoding="utf-8")
    flow = project.write_workflow(
        f"""
        name: nightly
        schedule: {{every: 1h}}
        {RETRY}
        steps:
          - id: items
            uses: file.fetch
            with: {{path: items.jsonl}}
          - id: audit
            uses: acme.audit
            with: {{url: "{base}/audit/{{{{ secrets.TOKEN | urlencode }}}}", token: "{{{{ secrets.TOKEN }}}}"}}
          - id: notify
            uses: webhook.deliver
            with:
              url: "{base}/hook/{{{{ secrets.TOKEN | urlencode }}}}?key={{{{ secrets.TOKEN | urlencode }}}}"
              headers: {{Authorization: "Bearer {{{{ secrets.HEADER_TOKEN }}}}"}}
              body: {{token: "{{{{ secrets.TOKEN }}}}"}}
        """
    )
    # the daemon (and its plugins) read the secrets from the environment, like a systemd unit
    process = DaemonProcess(project.workflows, project.env["AUTOMATOR_DATABASE_URL"], project.root / "daemon.log")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in project.env.items():
            patch.setenv(key, value)
        process.start()
    try:
        history = History(project.env["AUTOMATOR_DATABASE_URL"])
        try:
            assert project.cli("trigger", "nightly", name="trigger") == 0
            wait_for(lambda: [r for r in history.list_runs() if r.status != "running"], 30, "the run to finish")
            run_id = history.list_runs()[0].id
        finally:
            history.close()
        for path in ("/metrics", "/healthz"):
            project.written[f"daemon {path}"] = httpx.get(process.base + path, timeout=5).content
    finally:
        assert process.stop(signal.SIGTERM) == 0
    assert seen.got(SECRET) and seen.got(HEADER_SECRET)
    assert "audit: signing with ***" in process.log_text()  # the plugin's log lines are there, cleaned
    project.every_command(flow, run_id)


SCENARIOS: dict[str, Callable[[Project, HTTPServer, FakeOpenAI], None]] = {
    "successful run": successful_run,
    "webhook answers 500 echoing the request": webhook_answers_500,
    "fetch answers 401 echoing the header": fetch_answers_401,
    "template error naming the secret": template_error,
    "model answers quoting the secret": model_answer,
    "daemon, trigger, metrics": daemon,
}


@pytest.fixture(scope="module", params=list(SCENARIOS))
def written(
    request: pytest.FixtureRequest, servers: tuple[HTTPServer, FakeOpenAI], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, bytes]:
    """Run one scenario; every byte it wrote, by where it was written."""
    server, openai = servers
    openai.reset()
    project = new_project(tmp_path_factory.mktemp("secrets"), openai)
    SCENARIOS[request.param](project, server, openai)
    return project.scan_files()


@pytest.mark.parametrize(("encoding", "form"), LEAK_FORMS, ids=ENCODING_IDS)
def test_no_secret_in_anything_written(written: dict[str, bytes], encoding: str, form: str) -> None:
    found = leaks(written, form)
    assert not found, f"the {encoding} form leaked into: {', '.join(found)}"


# --- the defects one by one ---------------------------------------------------------------


WHOLE_FORMS = {label: form for label, form in encodings(SECRET).items() if not label.startswith("first")}


@pytest.mark.parametrize(("encoding", "form"), list(WHOLE_FORMS.items()), ids=list(WHOLE_FORMS))
def test_the_redactor_replaces_every_form(encoding: str, form: str) -> None:
    redactor = Redactor()
    redactor.add(SECRET)
    text = f"POST failed: {form} (see {form})"
    assert redactor.text(text) == "POST failed: *** (see ***)"
    assert form not in json.dumps(redactor.data({"error": text, "nested": [{"x": text}]}), ensure_ascii=False)


def test_redacted_data_keeps_its_structure() -> None:
    redactor = Redactor()
    redactor.add(SECRET)
    data = {"text": f'say "{SECRET}"', "n": 1, "list": [SECRET, None, True], "json": json.dumps({"k": SECRET})}
    assert redactor.data(data) == {"text": 'say "***"', "n": 1, "list": ["***", None, True], "json": '{"k": "***"}'}
    clean = {"text": "nothing secret", "n": [1, 2]}
    assert redactor.data(clean) is clean


def test_short_values_are_not_redacted() -> None:
    redactor = Redactor()
    redactor.add("abc")  # below the documented minimum of 4 characters
    assert redactor.text("abc abcd") == "abc abcd"


def test_step_summaries_show_no_secret(cli: Any, write_workflow: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # the export folder's name is the secret that makes it unguessable on the shared drive
    monkeypatch.setenv("AUTOMATOR_SECRET_DROP_FOLDER", "drop-7Qp2Zr9xLm4k")
    flow = write_workflow(
        """
        name: export
        steps:
          - id: items
            uses: file.fetch
            with: {path: items.jsonl}
          - id: out
            uses: file.deliver
            with: {path: "exports/{{ secrets.DROP_FOLDER }}/items.jsonl"}
        """
    )
    flow.with_name("items.jsonl").write_text('{"n": 1}\n{"n": 2}\n', encoding="utf-8")
    text = cli("run", flow)
    assert text.exit_code == 0, text.stderr
    assert "wrote 2 items to" in text.stdout
    as_json = cli("run", "--json", flow)
    summaries = [o["summary"] for o in json.loads(as_json.stdout)["outputs"]]
    assert any("wrote 2 items to" in s for s in summaries)
    assert "drop-7Qp2Zr9xLm4k" not in text.stdout + as_json.stdout
    assert (flow.parent / "exports" / "drop-7Qp2Zr9xLm4k" / "items.jsonl").exists()


def test_verbose_log_names_no_secret_webhook(
    tmp_path: Path, write_workflow: Any, httpserver: HTTPServer, history_url: str
) -> None:
    httpserver.expect_request(re.compile("^/services/")).respond_with_data("ok")
    hook = httpserver.url_for("/services/T0A1B2C3/B9Z8Y7X6/xoxb-9f8e7d6c5b4a3921")
    flow = write_workflow(
        """
        name: chat
        steps:
          - id: items
            uses: file.fetch
            with: {path: items.jsonl}
          - id: notify
            uses: webhook.deliver
            with: {url: "{{ secrets.CHAT_WEBHOOK }}"}
        """
    )
    flow.with_name("items.jsonl").write_text('{"n": 1}\n', encoding="utf-8")
    env = {**os.environ, "AUTOMATOR_DATABASE_URL": history_url, "AUTOMATOR_SECRET_CHAT_WEBHOOK": hook}
    done = subprocess.run(
        [sys.executable, "-m", "automator.cli.main", "-v", "run", str(flow)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert len(httpserver.log) == 1  # it was posted
    assert "xoxb-9f8e7d6c5b4a3921" not in done.stderr + done.stdout
    assert "HTTP Request" not in done.stderr  # httpx's request lines are not ours to print


def test_file_deliver_writes_no_secret(cli: Any, write_workflow: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOMATOR_SECRET_TOKEN", SECRET)
    flow = write_workflow(
        """
        name: notes
        steps:
          - id: items
            uses: file.fetch
            with: {path: items.jsonl}
          - id: shape
            uses: template.transform
            with: {mapping: {n: "{{ item.n }}", note: "called with {{ secrets.TOKEN }}"}}
          - id: jsonl
            uses: file.deliver
            with: {path: out.jsonl}
          - id: csv
            uses: file.deliver
            with: {path: out.csv}
        """
    )
    flow.with_name("items.jsonl").write_text('{"n": 1}\n', encoding="utf-8")
    assert cli("run", flow).exit_code == 0
    for name in ("out.jsonl", "out.csv"):
        written = flow.with_name(name).read_text(encoding="utf-8")
        assert "called with ***" in written
        assert not [label for label, form in encodings(SECRET).items() if form in written], written


def test_error_reply_echoing_a_secret_is_redacted_even_when_cut(
    cli: Any, history: History, write_workflow: Any, httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 400 reply quotes the JSON body it got; the reply is cut where the secret sits."""

    def reply(request: Request) -> Response:
        body = request.get_data(as_text=True)  # the secret in it is JSON-escaped
        # 164 + 14 characters before the body, and the secret 10 characters into it: the cut at
        # 200 characters falls 12 characters into the (JSON-escaped) secret
        return Response("x" * 164 + "invalid body: " + body, status=400)

    httpserver.expect_request("/hook").respond_with_handler(reply)
    monkeypatch.setenv("AUTOMATOR_SECRET_TOKEN", SECRET)
    flow = write_workflow(
        f"""
        name: post
        steps:
          - id: items
            uses: file.fetch
            with: {{path: items.jsonl}}
          - id: notify
            uses: webhook.deliver
            with:
              url: "{httpserver.url_for("/hook")}"
              body: {{token: "{{{{ secrets.TOKEN }}}}"}}
        """
    )
    flow.with_name("items.jsonl").write_text('{"n": 1}\n', encoding="utf-8")
    assert cli("run", flow).exit_code == 1
    reason = history.items(history.list_runs()[0].id)[0].reason
    assert "answered 400" in reason
    assert not [label for label, form in encodings(SECRET).items() if form in reason], reason


SYNC_PLUGIN = """
import os

import click

from automator import hookimpl


@click.command("acme-sync")
def sync() -> None:
    url = "https://api.example.com/sync?token=" + os.environ["AUTOMATOR_SECRET_TOKEN"]
    raise RuntimeError(f"cannot reach {url!r}")


@hookimpl
def register_commands(cli):
    cli.add_command(sync)
"""


def test_a_traceback_nobody_caught_shows_no_secret(tmp_path: Path, history_url: str) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "acme_sync.py").write_text(SYNC_PLUGIN, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "automator.cli.main", "--plugins-dir", str(plugins), "acme-sync"],
        capture_output=True,
        text=True,
        env={**os.environ, "AUTOMATOR_DATABASE_URL": history_url, "AUTOMATOR_SECRET_TOKEN": SECRET},
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "RuntimeError: cannot reach 'https://api.example.com/sync?token=***'" in done.stderr
    assert not [label for label, form in encodings(SECRET).items() if form in done.stderr], done.stderr
