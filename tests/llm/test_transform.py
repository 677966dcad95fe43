"""openai.transform in a workflow: structured output in, items and exact costs out."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import select

from automator.history.models import ModelCall
from automator.history.store import History
from tests.llm.fake_openai import FakeOpenAI

FLOW = """
name: triage
steps:
  - id: tickets
    uses: file.fetch
    with: {path: items.jsonl}
    key: "{{ item.id }}"
  - id: classify
    uses: openai.transform
    with:
      instructions: You triage support tickets for a shop.
      input: "Subject: {{ item.subject }}"
      output:
        schema:
          category: {enum: [billing, bug, how-to, other]}
          urgency: {type: integer, minimum: 1, maximum: 5}
          summary: string
      max_output_tokens: 200
"""

TICKETS = [
    {"id": 1, "subject": "billing: charged twice"},
    {"id": 2, "subject": "the checkout has a bug"},
    {"id": 3, "subject": "how-to change my address"},
]


def calls(history: History, run_id: int) -> list[ModelCall]:
    with history.session() as session:
        return list(session.scalars(select(ModelCall).where(ModelCall.run_id == run_id).order_by(ModelCall.id)))


def test_items_classified_with_structured_output(fake_openai: FakeOpenAI, run_flow, history: History) -> None:
    result = run_flow(FLOW, TICKETS)
    assert result.status == "succeeded", result.error
    assert result.counts["delivered"] == 3
    delivered = {row.seq: row.result for row in history.items(result.run_id)}
    assert [delivered[i]["category"] for i in range(3)] == ["billing", "bug", "how-to"]
    assert all(d["urgency"] == 1 for d in delivered.values())
    body = fake_openai.completions[0]["body"]
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["additionalProperties"] is False
    assert body["messages"][0] == {"role": "system", "content": "You triage support tickets for a shop."}
    assert body["messages"][-1]["role"] == "user"
    assert body["max_tokens"] == 200


def test_cost_recorded_to_the_nano_dollar(fake_openai: FakeOpenAI, run_flow, history: History) -> None:
    result = run_flow(FLOW, TICKETS)
    rows = calls(history, result.run_id)
    assert len(rows) == 3
    for row in rows:
        assert row.status == "ok" and row.mode == "sync"
        assert row.request_id and row.request_id.startswith("req-")
        expected = (Decimal(row.input_tokens) * Decimal("0.15") + Decimal(row.output_tokens) * Decimal("0.60")) / 10**6
        assert row.cost_usd == expected.quantize(Decimal("0.000000001"))
        assert row.model.startswith("gpt-4o-mini")
    usage = history.model_usage(result.run_id)["classify"]
    assert usage["calls"] == 3
    assert usage["input_tokens"] == sum(r.input_tokens for r in rows)
