"""Never paying twice (response cache, resume), budgets, rate limits, images, load-time checks."""

from __future__ import annotations

import base64
import struct
import time
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


def test_configured_limits_pace_requests_without_429s(fake_openai: FakeOpenAI, run_flow, history) -> None:
    fake_openai.rpm = 600  # 10 requests per second
    fake_openai.burst_s = 1.0
    items = [{"text": f"bug {i}"} for i in range(20)]
    started = time.monotonic()
    result = run_flow(flow(temperature=0.5, concurrency=10, extra="rpm: 600"), items)
    elapsed = time.monotonic() - started
    assert result.counts["delivered"] == 20
    assert fake_openai.statuses[429] == 0
    assert elapsed >= 1.2  # 20 requests at 10/s, minus the first second's budget


def test_limits_are_learned_from_headers(fake_openai: FakeOpenAI, run_flow, history) -> None:
    fake_openai.rpm = 600
    fake_openai.burst_s = 1.0
    items = [{"text": f"bug {i}"} for i in range(30)]
    result = run_flow(flow(temperature=0.5, concurrency=3), items)
    assert result.counts["delivered"] == 30
    # the first concurrent requests go out before any header is seen; after that the client paces itself
    assert fake_openai.statuses[429] <= 3


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
