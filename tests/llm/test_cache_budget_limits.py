"""Never paying twice (response cache, resume), budgets, rate limits, images, load-time checks."""

from __future__ import annotations

import base64
import struct
import zlib
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select

from automator.errors import WorkflowFileError
from automator.history.models import ModelCall
from automator.history.store import History
from automator.llm import tokens
from automator.spec.loader import load_workflow
from tests.llm.fake_openai import FakeOpenAI

FLOW = """
name: cached
{budget}
steps:
  - id: tickets
    uses: file.fetch
    with: {{path: items.jsonl}}
  - id: classify
    uses: openai.transform
    concurrency: {concurrency}
    with:
      instructions: Classify the ticket.
      input: "{{{{ item.text }}}}"
      output: {{schema: {{category: [billing, bug, other]}}, into: triage}}
      max_output_tokens: 40
      temperature: {temperature}
      {extra}
"""


def flow(temperature: float = 0, budget: str = "", concurrency: int = 4, extra: str = "") -> str:
    return FLOW.format(temperature=temperature, budget=budget, concurrency=concurrency, extra=extra)


def calls(history: History, run_id: int) -> list[ModelCall]:
    with history.session() as session:
        return list(session.scalars(select(ModelCall).where(ModelCall.run_id == run_id).order_by(ModelCall.id)))


ITEMS = [{"text": f"billing question number {i}"} for i in range(6)]


def test_identical_requests_are_answered_from_the_cache(fake_openai: FakeOpenAI, run_flow, history) -> None:
    items = [*ITEMS, ITEMS[0], ITEMS[1]]  # two repeats inside the run
    first = run_flow(flow(), items)
    assert first.status == "succeeded"
    assert len(fake_openai.completions) == 6
    second = run_flow(flow(), items)
    assert second.status == "succeeded"
    assert len(fake_openai.completions) == 6  # nothing new sent
    rows = calls(history, second.run_id)
    assert {r.status for r in rows} == {"cached"} and len(rows) == 8
    assert sum(r.cost_usd for r in rows) == 0
    assert history.model_usage(second.run_id) == {}
    results = [i.result for i in history.items(second.run_id)]
    assert results[0] == {"text": ITEMS[0]["text"], "triage": {"category": "billing"}}


def test_no_cache_reads_at_a_higher_temperature_unless_resuming(fake_openai: FakeOpenAI, run_flow, history) -> None:
    run_flow(flow(temperature=0.7), ITEMS)
    run_flow(flow(temperature=0.7), ITEMS)
    assert len(fake_openai.completions) == 12
    resumed = run_flow(flow(temperature=0.7), ITEMS, trigger="resume")
    assert resumed.status == "succeeded"
    assert len(fake_openai.completions) == 12  # a resumed run does not pay again


def test_the_run_budget_stops_calls_before_overspending(fake_openai: FakeOpenAI, run_flow, history) -> None:
    # each call costs at most ~ (60 in * 0.15 + 40 out * 0.60) / 1M = $0.000033
    result = run_flow(flow(budget="budget: {max_cost_usd: 0.00004}", concurrency=1), ITEMS)
    assert result.status == "failed"
    assert result.counts["delivered"] >= 1 and result.counts["failed"] >= 1
    assert result.counts["delivered"] + result.counts["failed"] == 6
    failed = history.items(result.run_id, ["failed"])
    assert all("max_cost_usd $0.000040 per run would be passed" in f.reason for f in failed)
    assert "budget" in (result.error or "")
    spent = sum(r.cost_usd for r in calls(history, result.run_id))
    assert 0 < spent <= Decimal("0.00004")
    assert len(fake_openai.completions) == result.counts["delivered"]


def test_the_daily_budget_counts_earlier_runs(fake_openai: FakeOpenAI, run_flow, history) -> None:
    budget = "budget: {max_cost_usd_per_day: 0.00006}"
    first = run_flow(flow(temperature=0.5, budget=budget, concurrency=1), ITEMS[:3])
    assert first.status == "succeeded"
    second = run_flow(flow(temperature=0.5, budget=budget, concurrency=1), ITEMS[3:])
    assert second.counts["failed"] >= 1
    assert "max_cost_usd_per_day" in history.items(second.run_id, ["failed"])[0].reason


def test_a_job_within_one_minutes_quota_goes_out_at_once(fake_openai: FakeOpenAI, run_flow, history) -> None:
    # 40 requests at 60 RPM: the API's bucket starts full, so no request needs to wait;
    # a limiter that starts empty would hold the 40th back for 40 s (past the step's timeout)
    fake_openai.rpm = 60
    items = [{"text": f"bug {i}"} for i in range(40)]
    extra = "rpm: 60"
    text = flow(temperature=0.5, concurrency=16, extra=extra).replace(
        "    uses: openai.transform\n", "    uses: openai.transform\n    timeout: 15s\n    retry: {attempts: 1}\n"
    )
    result = run_flow(text, items)
    assert result.counts["delivered"] == 40, history.items(result.run_id, ["failed"])[:1]
    assert fake_openai.statuses[429] == 0
    (summary,) = [text for step, text in result.summaries if step == "classify"]
    assert "waited" not in summary  # the limiter never held a request back


def test_the_limiter_starts_full_and_refills_at_the_limits_rate() -> None:
    import asyncio

    from automator.llm.limiter import RateLimiter

    now = [100.0]
    limiter = RateLimiter(rpm=60, tpm=6_000, clock=lambda: now[0])

    async def burst() -> None:
        for _ in range(50):
            await limiter.acquire(100)

    asyncio.run(burst())
    assert limiter.waited_s == 0  # a minute's allowance is there from the start
    assert limiter.tokens.wait_for(1_100) == pytest.approx(1.0)  # 1,000 left; 100 more come in a second
    assert limiter.requests.wait_for(1) == 0
    now[0] += 30
    # refilled at 6,000 / 60 per second: 4,000 there now
    assert limiter.tokens.wait_for(4_000) == 0
    assert limiter.tokens.wait_for(4_100) == pytest.approx(1.0)


def test_tpm_counts_what_the_api_counts_not_the_schema(fake_openai: FakeOpenAI, run_flow, history) -> None:
    from tests.llm.fake_openai import rate_limit_tokens

    items = [{"text": f"billing question number {i} about an invoice"} for i in range(30)]
    probe = run_flow(flow(temperature=0.5, concurrency=16), items)
    assert probe.counts["delivered"] == 30
    charged = sum(rate_limit_tokens(r["body"]) for r in fake_openai.completions)
    fake_openai.reset()
    # exactly what one minute allows for these requests (plus rounding slack): counting the
    # output schema's tokens too would need more than the minute holds, and wait or be refused
    tpm = charged + 30
    fake_openai.tpm = tpm
    text = flow(temperature=0.5, concurrency=16, extra=f"tpm: {tpm}").replace(
        "    uses: openai.transform\n", "    uses: openai.transform\n    timeout: 15s\n    retry: {attempts: 1}\n"
    )
    result = run_flow(text, items)
    assert result.counts["delivered"] == 30, history.items(result.run_id, ["failed"])[:1]
    assert fake_openai.statuses[429] == 0
    (summary,) = [text for step, text in result.summaries if step == "classify"]
    assert "waited" not in summary


def test_limits_are_learned_from_headers(fake_openai: FakeOpenAI, run_flow, history) -> None:
    fake_openai.rpm = 20
    items = [{"text": f"bug {i}"} for i in range(20)]
    result = run_flow(flow(temperature=0.5, concurrency=3), items)
    assert result.counts["delivered"] == 20
    assert fake_openai.statuses[429] == 0  # the minute's allowance is enough: nothing refused


def tiny_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_images_are_sent_as_data_urls_and_counted(fake_openai: FakeOpenAI, run_flow, history, tmp_path) -> None:
    folder = tmp_path / "wf"
    folder.mkdir(exist_ok=True)
    (folder / "wide.png").write_bytes(tiny_png(1100, 600))
    extra = "images: [{path: '{{ item.image }}', detail: high}, {url: 'https://example.com/x.png', detail: low}]"
    result = run_flow(flow(extra=extra), [{"text": "a bug", "image": "wide.png"}, {"text": "x", "image": "gone.png"}])
    assert result.counts["delivered"] == 1 and result.counts["quarantined"] == 1
    assert "gone.png" in history.items(result.run_id, ["quarantined"])[0].reason
    parts = fake_openai.completions[0]["body"]["messages"][-1]["content"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert base64.b64decode(parts[1]["image_url"]["url"].split(",")[1])[:4] == b"\x89PNG"
    # 1100x600 -> short side 768? no, it is 600: 3 x 2 tiles; the URL at low detail is the base cost
    assert tokens.image_tokens("high", (1100, 600)) == 2833 + 5667 * 6
    row = calls(history, result.run_id)[0]
    assert row.input_tokens > 2833 * 2 + 5667 * 6


def test_token_counts_match_what_the_api_bills(fake_openai: FakeOpenAI, run_flow, history) -> None:
    from automator.llm.schema import build

    result = run_flow(flow(), ITEMS[:1])
    body = fake_openai.completions[0]["body"]
    schema = build({"category": ["billing", "bug", "other"]})
    estimate = tokens.count_messages(body["messages"], schema=schema.sent)
    assert calls(history, result.run_id)[0].input_tokens == estimate


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("max_output_tokens: 20000", "less than or equal to 16384"),
        ("output: {schema: {type: object, properties: {a: {type: string}}, allOf: [{}]}}", "allOf is not supported"),
        ("output: {schema: {a: strin}}", "unknown type 'strin'"),
        ("mode: stream", "'sync' or 'batch'"),
        ("batch_max_requests: 60000", "less than or equal to 50000"),
    ],
)
def test_bad_settings_are_found_when_the_file_is_loaded(llm_plugins, tmp_path: Path, setting, message) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "steps:\n  - id: f\n    uses: file.fetch\n    with: {path: x.jsonl}\n"
        f"  - id: m\n    uses: openai.transform\n    with:\n      instructions: hi\n      {setting}\n"
    )
    with pytest.raises(WorkflowFileError) as caught:
        load_workflow(path, llm_plugins)
    text = str(caught.value)
    assert message in text and str(path) + ":" in text


def test_limits_learned_from_headers_count_the_requests_still_in_flight(
    fake_openai: FakeOpenAI, run_flow, history
) -> None:
    # no rpm: in the step, so the limit is learned from the server's headers; the server
    # counts a request when it answers it, so its `remaining` does not yet include the
    # 15 others in flight: a client that took `remaining` at its word sent too many
    fake_openai.rpm = 240
    fake_openai.latency_s = 0.05
    items = [{"text": f"bug {i}"} for i in range(256)]  # a minute's 240, then 16 at 4/s
    result = run_flow(flow(temperature=0.5, concurrency=16), items)
    assert result.counts["delivered"] == 256, history.items(result.run_id, ["failed"])[:1]
    assert fake_openai.statuses[429] == 0
