"""Model throughput: 2,000 items through openai.transform against rate limits, with 200 ms latency.

The fake OpenAI server (tests/llm/fake_openai.py) runs in its own process, answering
after 200 ms and enforcing requests and tokens per minute set so that both limits allow
about the same rate (either can bind). The run goes through the real engine, history
and SDK. Reported: achieved requests/s and items/s against the ceiling the limits allow,
the share of the TPM ceiling reached (a request counted as the API counts it: its messages
plus max_tokens, not the output schema; a limit's bucket starts with a minute's allowance),
429s, items lost (must be 0), and cost per 1,000 items naive (item text first, no cache)
against ours (static instructions first so the prompt cache applies; response cache).
Then a burst start: a job that fits in one minute's quota, paced by our limiter (``rpm:``
set) against an unpaced client (no limits anywhere): the limiter must not slow it down.

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
REQUESTS_PER_S = 20  # the request limit: 1,200 RPM, so the job is larger than one minute's allowance
BURST_ITEMS = 2_000
BURST_RPM = 3_000
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


def workflow(name: str, *, naive: bool, extra: str = "") -> str:
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
      {extra}
"""


def tokens_per_request(items: list[dict[str, Any]]) -> float:
    """What the TPM limit counts per request, as the API does: the messages plus max output (no schema)."""
    from automator.llm.tokens import count_messages

    sample = items[:200]
    total = 0
    for item in sample:
        messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": item["text"]}]
        total += count_messages(messages) + MAX_OUTPUT
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


def run_once(
    folder: Path, name: str, items: list[dict[str, Any]], base_url: str, *, naive: bool, extra: str = ""
) -> dict[str, Any]:
    from sqlalchemy import func, select

    from automator.engine.runner import run_workflow
    from automator.history.models import LedgerItem, ModelCall
    from automator.history.store import History
    from automator.plugins.manager import load_plugins
    from automator.spec.loader import load_workflow

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (folder / "flow.yaml").write_text(workflow(name, naive=naive, extra=extra))
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
        # what the limits allow over the run's time: a full minute's bucket at the start, then the rate
        span = ours["elapsed"]
        ceiling_rps = min(rpm + rpm / 60 * span, (tpm + tpm / 60 * span) / per_request) / span
    finally:
        server.terminate()
        server.wait(timeout=10)
    naive_server, naive_url = start_server("--latency", str(LATENCY_S))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            naive = run_once(Path(tmp) / "naive", "naive", items[:NAIVE_SAMPLE], naive_url, naive=True)
            # a job within one minute's quota: the same items unpaced, then paced at BURST_RPM
            burst = [dict(i, text=f"{i['text']} #{n}") for n, i in enumerate(items[:BURST_ITEMS])]
            unpaced = run_once(Path(tmp) / "unpaced", "unpaced", burst, naive_url, naive=False)
            paced = run_once(Path(tmp) / "paced", "paced", burst, naive_url, naive=False, extra=f"rpm: {BURST_RPM}")
    finally:
        naive_server.terminate()
        naive_server.wait(timeout=10)
    # what the TPM limit allowed over the run: a full minute at the start, then tpm/60 per second
    tpm_allowed = tpm + tpm / 60 * ours["elapsed"]
    tpm_used = ours["requests_ok"] * per_request
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
        (
            "TPM ceiling reached",
            f"{tpm_used / tpm_allowed:.0%} of the {tpm_allowed:,.0f} tokens the limit allowed in "
            f"{ours['elapsed']:.1f} s (a full minute at the start, then {tpm / 60:,.0f}/s)",
        ),
        ("429s", str(stats.get(429, 0))),
        (
            "burst start vs unpaced",
            f"{paced['elapsed']:.1f} s paced at {BURST_RPM:,} RPM vs {unpaced['elapsed']:.1f} s unpaced "
            f"({paced['elapsed'] / unpaced['elapsed']:.2f}x; {BURST_ITEMS:,} requests fit in a minute's quota)",
        ),
        ("outcomes", ", ".join(f"{k} {v}" for k, v in counts.items())),
        ("items lost", str(ours["lost"])),
        ("cost / 1,000 items naive", f"${naive_per_1000:.6f} (item first, no cache; {NAIVE_SAMPLE} items)"),
        ("cost / 1,000 items ours", f"${ours_per_1000:.6f} ({1 - ours_per_1000 / naive_per_1000:.0%} less)"),
    ]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    for metric, value in main():
        print(f"{metric:>26}  {value}")
