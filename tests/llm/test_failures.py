"""Every way a model call can go wrong ends in an outcome, with every attempt recorded."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from automator.history.models import ModelCall
from automator.history.store import History
from tests.conftest import dump_history
from tests.llm.fake_openai import FakeOpenAI

FLOW = """
name: failures
steps:
  - id: tickets
    uses: file.fetch
    with: {{path: items.jsonl}}
  - id: classify
    uses: openai.transform
    {retry}
    with:
      instructions: Classify the ticket.
      input: "{{{{ item.text }}}}"
      output:
        schema:
          category: [billing, bug, other]
      max_output_tokens: 50
      max_repairs: {repairs}
      request_timeout: {timeout}
"""


def flow(attempts: int | None = 4, repairs: int = 2, timeout: str = "5s") -> str:
    """``attempts`` None: no retry block (the default policy, 3 attempts, 1 s backoff)."""
    retry = "" if attempts is None else f"retry: {{attempts: {attempts}, backoff: 10ms}}"
    return FLOW.format(retry=retry, repairs=repairs, timeout=timeout)


def calls(history: History, run_id: int) -> list[ModelCall]:
    with history.session() as session:
        return list(session.scalars(select(ModelCall).where(ModelCall.run_id == run_id).order_by(ModelCall.id)))


def only_item(history: History, run_id: int):
    (item,) = history.items(run_id)
    return item


def test_server_errors_are_retried_and_every_attempt_recorded(fake_openai: FakeOpenAI, run_flow, history) -> None:
    result = run_flow(flow(), [{"text": "billing question !!500*2!!"}])
    assert result.status == "succeeded"
    rows = calls(history, result.run_id)
    assert [r.status for r in rows] == ["error", "error", "ok"]
    assert [r.attempt for r in rows] == [1, 2, 3]
    assert "500" in (rows[0].error or "")
    assert rows[0].request_id and rows[0].cost_usd == 0
    assert only_item(history, result.run_id).result == {"category": "billing"}


def test_429_waits_for_retry_after(fake_openai: FakeOpenAI, run_flow, history) -> None:
    fake_openai.retry_after_s = 0.6
    fake_openai.script("429")
    started = time.monotonic()
    result = run_flow(flow(), [{"text": "a bug"}])
    assert time.monotonic() - started >= 0.6
    assert result.status == "succeeded"
    assert [r.status for r in calls(history, result.run_id)] == ["error", "ok"]
    assert fake_openai.statuses[429] == 1


def test_retries_exhausted_fail_the_item_with_the_last_error(fake_openai: FakeOpenAI, run_flow, history) -> None:
    result = run_flow(flow(attempts=2), [{"text": "x !!503!!"}, {"text": "a bug"}])
    assert result.status == "failed"
    assert result.counts == {"fetched": 2, "delivered": 1, "skipped": 0, "quarantined": 0, "failed": 1}
    failed = history.items(result.run_id, ["failed"])[0]
    assert "gave up after 2 attempt(s)" in failed.reason and "503" in failed.reason
    assert len([c for c in calls(history, result.run_id) if c.item_seq == 0]) == 2


def test_a_bad_request_is_not_retried(fake_openai: FakeOpenAI, run_flow, history) -> None:
    result = run_flow(flow(), [{"text": "x !!400!!"}])
    assert result.counts["failed"] == 1
    assert len(fake_openai.completions) == 1
    assert "400" in only_item(history, result.run_id).reason


def test_timeouts_are_retried(fake_openai: FakeOpenAI, run_flow, history) -> None:
    fake_openai.slow_s = 1.5
    result = run_flow(flow(timeout="300ms"), [{"text": "bug !!slow*1!!"}])
    assert result.status == "succeeded"
    rows = calls(history, result.run_id)
    assert [r.status for r in rows] == ["error", "ok"]
    assert "timed out" in (rows[0].error or "")


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("length", "cut off at max_output_tokens (50)"),
        ("refuse", "the model refused"),
        ("filter", "content filter"),
        ("badjson", "not valid JSON"),
        ("badschema", "does not match the schema"),
    ],
)
def test_a_bad_answer_is_asked_again_with_the_problem(fake_openai: FakeOpenAI, run_flow, history, kind, said) -> None:
    result = run_flow(flow(), [{"text": f"a bug !!{kind}*1!!"}])
    assert result.status == "succeeded", result.error
    rows = calls(history, result.run_id)
    assert [r.status for r in rows] == ["rejected", "ok"]
    assert said in (rows[0].error or "")
    assert rows[0].input_tokens > 0 and rows[0].cost_usd > 0  # a rejected answer is still paid for
    second = fake_openai.completions[1]["body"]["messages"]
    assert second[-2]["role"] == "assistant"
    assert said in second[-1]["content"]
    assert only_item(history, result.run_id).result == {"category": "bug"}


def test_an_answer_never_accepted_quarantines_the_item(fake_openai: FakeOpenAI, run_flow, history) -> None:
    result = run_flow(flow(repairs=1), [{"text": "x !!refuse!!"}, {"text": "a bug"}])
    assert result.counts["quarantined"] == 1 and result.counts["delivered"] == 1
    item = history.items(result.run_id, ["quarantined"])[0]
    assert "no acceptable answer in 2 tries" in item.reason and "refused" in item.reason
    assert item.result == {"text": "x !!refuse!!"}  # the item is kept as it was
    assert [r.status for r in calls(history, result.run_id) if r.item_seq == 0] == ["rejected", "rejected"]


def test_a_prompt_too_long_is_quarantined_and_never_sent(fake_openai: FakeOpenAI, run_flow, history) -> None:
    huge = "lorem ipsum dolor " * 45_000  # about 135,000 tokens
    result = run_flow(flow(), [{"text": huge}, {"text": "a bug"}])
    assert result.counts["quarantined"] == 1
    reason = history.items(result.run_id, ["quarantined"])[0].reason
    assert "prompt too long" in reason and "128,000-token context" in reason and "127,950" in reason
    assert len(fake_openai.completions) == 1  # only the short one


def test_the_api_key_is_written_nowhere(fake_openai: FakeOpenAI, run_flow, history, tmp_path) -> None:
    from tests.llm.conftest import API_KEY

    fake_openai.api_key = "sk-the-right-one"  # ours is refused, and the error names it
    result = run_flow(flow(), [{"text": f"item {i}"} for i in range(5)])
    assert result.status == "failed" and result.counts["failed"] == 5
    assert API_KEY not in (result.error or "")
    assert "***" in history.items(result.run_id)[0].reason
    history.close()
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    written += dump_history(history.url).encode()  # a server database keeps its files elsewhere
    assert API_KEY.encode() not in written
    assert b"Incorrect API key" in written  # the error itself was recorded
