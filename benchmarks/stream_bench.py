"""Streaming (issue 9): memory bounded by chunks in flight, and the first delivery before the model step ends.

(a) N items (default 1,000,000) through file.fetch → template.transform → schema.validate
    → file.deliver with full history (a fresh SQLite database in a temp folder), as
    ``automator run`` in a subprocess: the child's peak RSS (from ``wait4``) and the time
    per item. Targets: peak RSS < 300 MB at 1M items; time per item no worse than today.
(b) 2,000 items through openai.transform (the fake OpenAI server, 200 ms latency) →
    webhook.deliver to a loopback receiver: seconds from the process's start to the first
    POST received, and to the end. Target: first delivery < 2 s.

    python benchmarks/stream_bench.py [--items 1000000] [--model-items 2000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pytest_httpserver import HTTPServer  # noqa: E402 - after the repository is importable

from tests.daemon.conftest import Receiver  # noqa: E402
from tests.llm.fake_openai import FakeOpenAI  # noqa: E402

MAPPING = {
    "id": "{{ item.id }}",
    "title": "{{ item.subject | upper }}",
    "team": "{{ 'finance' if 'refund' in item.body else 'support' }}",
    "urgent": "{{ item.priority in ['high', 'urgent'] }}",
}
SCHEMA = {
    "type": "object",
    "required": ["id", "title", "team", "urgent"],
    "properties": {"id": {"type": "integer"}, "title": {"type": "string"}, "urgent": {"type": "boolean"}},
}
FILE_FLOW = f"""
name: stream
steps:
  - id: read
    uses: file.fetch
    with: {{path: items.jsonl}}
    key: "{{{{ item.id }}}}"
  - id: shape
    uses: template.transform
    with:
      mapping: {json.dumps(MAPPING)}
  - id: check
    uses: schema.validate
    with:
      schema: {json.dumps(SCHEMA)}
      on_invalid: quarantine
  - id: write
    uses: file.deliver
    with: {{path: out.jsonl}}
"""
MODEL_FLOW = """
name: first-delivery
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
    with:
      url: "{url}"
      body: {{id: "{{{{ item.id }}}}", category: "{{{{ item.answer.category }}}}"}}
"""
API_KEY = "sk-stream-bench-0123456789abcdef"
MODEL_LATENCY_S = 0.2


def child_env(folder: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "AUTOMATOR_DATABASE_URL": f"sqlite:///{folder / 'history.db'}",
        "AUTOMATOR_HOME": str(folder / "home"),
        # this tree's engine and standard steps, whatever copy is installed
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")]),
        **extra,
    }


def write_items(path: Path, count: int) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(count):
            handle.write(
                json.dumps(
                    {
                        "id": i,
                        "subject": f"ticket number {i}",
                        "body": "please refund" if i % 3 == 0 else "the app crashes",
                        "priority": ["low", "normal", "high", "urgent"][i % 4],
                    }
                )
                + "\n"
            )


def file_run(items: int) -> dict[str, float]:
    """(a): the child's wall time and peak RSS for ``items`` through four steps."""
    with tempfile.TemporaryDirectory(prefix="automator-stream-") as tmp:
        folder = Path(tmp)
        write_items(folder / "items.jsonl", items)
        (folder / "stream.yaml").write_text(FILE_FLOW, encoding="utf-8")
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "automator.cli.main", "run", str(folder / "stream.yaml"), "--json"],
            env=child_env(folder),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # wait4: this child's own peak, not the largest of every child so far (RUSAGE_CHILDREN)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out = process.stdout.read() if process.stdout else b""
        err = process.stderr.read() if process.stderr else b""
        if process.returncode != 0:
            raise RuntimeError(f"automator run exited {process.returncode}: {err.decode()[-500:]}")
        result = json.loads(out)
        delivered = result.get("counts", {}).get("delivered", result.get("delivered"))
        written = sum(1 for _ in (folder / "out.jsonl").open(encoding="utf-8"))
    if written != items:
        raise RuntimeError(f"{written} of {items} items written (run said delivered={delivered})")
    return {"seconds": elapsed, "peak_rss_mb": usage.ru_maxrss / 1024}  # ru_maxrss: KiB on Linux


def first_delivery(items: int) -> dict[str, float]:
    """(b): seconds from the process's start to the first model call, the first POST, the end."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    fake = FakeOpenAI().start()
    fake.latency_s, fake.api_key = MODEL_LATENCY_S, API_KEY
    http = HTTPServer(host="127.0.0.1", threaded=True)
    http.start()
    try:
        receiver = Receiver(http)
        with tempfile.TemporaryDirectory(prefix="automator-first-") as tmp:
            folder = Path(tmp)
            words = ["charged twice", "app crashes", "refund please", "login fails", "invoice missing"]
            (folder / "items.jsonl").write_text(
                "".join(json.dumps({"id": i, "text": f"Ticket {i}: {words[i % 5]}"}) + "\n" for i in range(items)),
                encoding="utf-8",
            )
            (folder / "flow.yaml").write_text(MODEL_FLOW.format(url=receiver.url), encoding="utf-8")
            started = time.monotonic()
            process = subprocess.Popen(
                [sys.executable, "-m", "automator.cli.main", "run", str(folder / "flow.yaml"), "--json"],
                env=child_env(folder, OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY=API_KEY),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            _, err = process.communicate(timeout=1800)
            ended = time.monotonic()
            if process.returncode != 0:
                raise RuntimeError(f"automator run exited {process.returncode}: {err.decode()[-500:]}")
            if len({(p.body or {}).get("id") for p in receiver.posts}) != items:
                raise RuntimeError(f"{len(receiver.posts)} POSTs for {items} items")
            first_call = min(c.arrived for c in fake.chat_calls)
            first_post = min(p.arrived for p in receiver.posts)
    finally:
        http.stop()
        fake.stop()
    return {"first_call_s": first_call - started, "first_post_s": first_post - started, "total_s": ended - started}


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="(a): items through the four file steps")
    parser.add_argument("--model-items", type=int, default=2_000, help="(b): items through the model step")
    args = parser.parse_args([] if argv is None else argv)
    a = file_run(args.items)
    b = first_delivery(args.model_items)
    return [
        ("stream: items (a)", f"{args.items:,} through fetch → template → validate → file.deliver, full history"),
        ("peak RSS of the run", f"{a['peak_rss_mb']:.0f} MB (target < 300 MB at 1M)"),
        ("time per item", f"{a['seconds'] / args.items * 1e6:.1f} µs ({a['seconds']:.1f} s, process start included)"),
        ("model items (b)", f"{args.model_items:,} at {MODEL_LATENCY_S * 1000:.0f} ms latency → webhook.deliver"),
        ("first model call", f"{b['first_call_s']:.2f} s after the process started"),
        ("first delivery", f"{b['first_post_s']:.2f} s after the process started (target < 2 s)"),
        ("all delivered", f"{b['total_s']:.1f} s after the process started"),
    ]


if __name__ == "__main__":
    for name, value in main(sys.argv[1:]):
        print(f"{name:24} {value}")
