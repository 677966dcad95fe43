"""Model throughput: 2,000 items through openai.transform against rate limits, with 200 ms latency.

The fake OpenAI server (tests/llm/fake_openai.py) runs in its own process, answering
after 200 ms and enforcing requests and tokens per minute set so that both limits allow
about the same rate (either can bind). The run goes through the real engine, history
and SDK. Reported: achieved requests/s and items/s against the ceiling the limits allow,
429s, items lost (must be 0), and cost per 1,000 items naive (item text first, no cache)
against ours (static instructions first so the prompt cache applies; response cache).

``python benchmarks/llm_throughput.py`` or via ``python benchmarks/run.py --only llm``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ITEMS = 2_000
DUPLICATE_SHARE = 0.10  # tickets sent twice (a re-opened ticket, a retried webhook)
LATENCY_S = 0.2
REQUESTS_PER_S = 60  # the request limit: 3,600 RPM
MAX_OUTPUT = 60
NAIVE_SAMPLE = 200
CONCURRENCY = 32

# long, static instructions: over 1,024 tokens, so OpenAI-style prompt caching applies
INSTRUCTIONS = "You triage support tickets for an e-commerce shop. Answer with the category.\n" + "\n".join(
    f"Rule {i}: tickets that mention topic {i} (for example order issue number {i}, delivery case {i}, "
    f"or account question {i}) belong to the category the rule table assigns to group {i % 4}."
    for i in range(40)
)


def tickets() -> list[dict[str, Any]]:
    rng = random.Random(7)
    words = ["charged", "refund", "invoice", "crash", "blank", "page", "address", "delivery", "login"]
    unique = int(ITEMS * (1 - DUPLICATE_SHARE))
    base = [
        {"id": i, "text": f"Ticket {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 40)))}
        for i in range(unique)
    ]
    repeats = [dict(rng.choice(base), id=unique + j) for j in range(ITEMS - unique)]
    items = base + repeats
    rng.shuffle(items)
    return items


def workflow(name: str, *, naive: bool) -> str:
    instructions = json.dumps("You are a helpful assistant." if naive else INSTRUCTIONS)
    # naive: the item first and the long instructions after it, so no two prompts share a prefix
    user = json.dumps(("{{ item.text }}\n\n" + INSTRUCTIONS) if naive else "{{ item.text }}")
    return f"""
name: {name}
steps:
  - id: tickets
    uses: file.fetch
    with: {{path: items.jsonl}}
  - id: classify
    uses: openai.transform
    concurrency: {CONCURRENCY}
    with:
      instructions: {instructions}
      input: {user}
      output: {{schema: {{category: [billing, bug, how-to, other]}}}}
      max_output_tokens: {MAX_OUTPUT}
      cache: {"false" if naive else "true"}
"""


def tokens_per_request(items: list[dict[str, Any]]) -> float:
    """What the TPM limit counts per request: the prompt estimate plus max output."""
    from automator.llm.schema import build
    from automator.llm.tokens import count_messages

    schema = build({"category": ["billing", "bug", "how-to", "other"]}).sent
    sample = items[:200]
    total = 0
    for item in sample:
        messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": item["text"]}]
        total += count_messages(messages, schema=schema) + MAX_OUTPUT
    return total / len(sample)


def start_server(*args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.llm.fake_openai", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    base_url = process.stdout.readline().strip()
    if not base_url.startswith("http"):
        process.kill()
        raise RuntimeError("the fake OpenAI server did not start")
    return process, base_url


def server_stats(base_url: str) -> dict[str, int]:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/_stats", timeout=5) as response:
        return {int(k): v for k, v in json.load(response)["statuses"].items()}


def run_once(folder: Path, name: str, items: list[dict[str, Any]], base_url: str, *, naive: bool) -> dict[str, Any]:
    from sqlalchemy import func, select

    from automator.engine.runner import run_workflow
    from automator.history.models import LedgerItem, ModelCall
    from automator.history.store import History
    from automator.plugins.manager import load_plugins
    from automator.spec.loader import load_workflow

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (folder / "flow.yaml").write_text(workflow(name, naive=naive))
    os.environ["OPENAI_BASE_URL"] = base_url
    os.environ["OPENAI_API_KEY"] = "sk-benchmark"
    history = History(f"sqlite:///{folder / 'history.db'}")
    plugins = load_plugins(None)
    flow = load_workflow(folder / "flow.yaml", plugins)
    started = time.perf_counter()
    result = asyncio.run(run_workflow(flow, history, plugins))
    elapsed = time.perf_counter() - started
    with history.engine.connect() as conn:
        ended = conn.execute(
            select(func.count()).where(LedgerItem.run_id == result.run_id, LedgerItem.outcome != "pending")
        ).scalar_one()
        sent, cost = conn.execute(
            select(func.count(), func.coalesce(func.sum(ModelCall.cost_usd), 0)).where(
                ModelCall.run_id == result.run_id, ModelCall.status == "ok"
            )
        ).one()
    history.close()
    return {
        "elapsed": elapsed,
        "counts": result.counts,
        "lost": len(items) - ended,
        "requests_ok": int(sent),
        "cost": Decimal(str(cost)),
    }


def main() -> list[tuple[str, str]]:
    items = tickets()
    per_request = tokens_per_request(items)
    rpm = REQUESTS_PER_S * 60
    tpm = int(per_request * REQUESTS_PER_S * 60 * 1.02)  # both limits allow ~60 requests/s
    server, base_url = start_server("--latency", str(LATENCY_S), "--rpm", str(rpm), "--tpm", str(tpm))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ours = run_once(Path(tmp) / "ours", "ours", items, base_url, naive=False)
            stats = server_stats(base_url)
        ceiling_rps = min(rpm / 60, tpm / 60 / per_request)
    finally:
        server.terminate()
        server.wait(timeout=10)
    naive_server, naive_url = start_server("--latency", str(LATENCY_S))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            naive = run_once(Path(tmp) / "naive", "naive", items[:NAIVE_SAMPLE], naive_url, naive=True)
    finally:
        naive_server.terminate()
        naive_server.wait(timeout=10)
    achieved_rps = ours["requests_ok"] / ours["elapsed"]
    # the items whose answers came from the response cache need no request at all
    ceiling_items = ceiling_rps * ITEMS / max(ours["requests_ok"], 1)
    achieved_items = ITEMS / ours["elapsed"]
    naive_per_1000 = naive["cost"] / NAIVE_SAMPLE * 1000
    ours_per_1000 = ours["cost"] / ITEMS * 1000
    counts = ours["counts"]
    return [
        ("items", f"{ITEMS:,} ({int(ITEMS * DUPLICATE_SHARE)} repeats), latency {LATENCY_S * 1000:.0f} ms"),
        ("limits", f"{rpm:,} RPM / {tpm:,} TPM ({per_request:,.0f} tokens per request counted)"),
        ("requests/s", f"{achieved_rps:.1f} of a {ceiling_rps:.1f} ceiling ({achieved_rps / ceiling_rps:.0%})"),
        ("items/s", f"{achieved_items:.1f} of a {ceiling_items:.1f} ceiling ({achieved_items / ceiling_items:.0%})"),
        ("429s", str(stats.get(429, 0))),
        ("outcomes", ", ".join(f"{k} {v}" for k, v in counts.items())),
        ("items lost", str(ours["lost"])),
        ("cost / 1,000 items naive", f"${naive_per_1000:.6f} (item first, no cache; {NAIVE_SAMPLE} items)"),
        ("cost / 1,000 items ours", f"${ours_per_1000:.6f} ({1 - ours_per_1000 / naive_per_1000:.0%} less)"),
    ]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    for metric, value in main():
        print(f"{metric:>26}  {value}")
