"""The model-call service: one request per identical prompt, one retry policy, clear errors, redacted answers."""

from __future__ import annotations

import shutil
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select

from automator.errors import WorkflowFileError
from automator.history.models import ModelCall
from automator.history.store import History
from automator.spec.loader import load_workflow
from tests.llm.fake_openai import FakeOpenAI

REPO = Path(__file__).resolve().parents[2]

FLOW = """
name: model-calls
steps:
  - id: tickets
    uses: file.fetch
    with: {{path: items.jsonl}}
  - id: classify
    uses: openai.transform
    concurrency: {concurrency}
    {retry}
    with:
      instructions: Classify the ticket.
      input: "{{{{ item.text }}}}"
      output:
        schema:
          category: [billing, bug, other]
          summary: string
      max_output_tokens: 60
"""


def flow(*, concurrency: int = 16, retry: str = "") -> str:
    return FLOW.format(concurrency=concurrency, retry=retry)


def calls(history: History, run_id: int) -> list[ModelCall]:
    with history.session() as session:
        return list(session.scalars(select(ModelCall).where(ModelCall.run_id == run_id).order_by(ModelCall.id)))


def test_identical_requests_in_flight_are_paid_once(fake_openai: FakeOpenAI, run_flow, history: History) -> None:
    fake_openai.latency_s = 0.05  # answers take a while: identical requests overlap
    prompts = [f"ticket number {n}: the invoice is wrong" for n in range(10)]
    items = [{"text": prompts[i % 10]} for i in range(160)]
    result = run_flow(flow(concurrency=16), items)
    assert result.status == "succeeded"
    assert result.counts["delivered"] == 160
    assert len(fake_openai.completions) == 10  # one request per unique prompt
    rows = calls(history, result.run_id)
    assert len([r for r in rows if r.status == "ok"]) == 10
    assert len([r for r in rows if r.status == "cached"]) == 150
    assert sum(r.cost_usd for r in rows) == fake_openai.billed_usd() > 0
    for item in history.items(result.run_id):  # every item has the answer to its own prompt
        assert item.result == {"category": "billing", "summary": items[item.seq]["text"]}


def test_the_shipped_triage_workflow_in_batch_mode_answers_every_ticket(
    fake_openai: FakeOpenAI, tmp_path: Path, history: History, llm_plugins
) -> None:
    import asyncio

    from automator.engine.runner import run_workflow

    folder = tmp_path / "workflows"
    shutil.copytree(REPO / "workflows" / "data", folder / "data")
    text = (REPO / "workflows" / "triage-tickets.yaml").read_text(encoding="utf-8")
    text = text.replace("# mode: batch", "mode: batch").replace(
        "# batch_poll_interval: 1m", "batch_poll_interval: 50ms"
    )
    assert "\n      mode: batch" in text
    (folder / "triage-tickets.yaml").write_text(text, encoding="utf-8")
    workflow = load_workflow(folder / "triage-tickets.yaml", llm_plugins)
    result = asyncio.run(run_workflow(workflow, history, llm_plugins))
    tickets = (folder / "data" / "tickets.jsonl").read_text(encoding="utf-8").splitlines()
    assert result.counts["fetched"] == 24 == len(tickets)
    assert result.counts["delivered"] == 24, history.items(result.run_id, ["failed"])[:1]
    assert result.status == "succeeded"
    rows = calls(history, result.run_id)
    paid = [r for r in rows if r.status == "ok"]
    cached = [r for r in rows if r.status == "cached"]
    assert len(paid) + len(cached) == 24 and cached  # the sample has duplicate tickets
    assert len(fake_openai.billed) == len(paid)  # each unique request paid once
    assert sum(r.cost_usd for r in rows) == fake_openai.billed_usd()


@pytest.mark.parametrize(("retry", "requests"), [("", 3), ("retry: {attempts: 2, backoff: 10ms}", 2)])
def test_the_model_step_follows_the_steps_retry_policy(
    fake_openai: FakeOpenAI, run_flow, history: History, retry: str, requests: int
) -> None:
    # no retry block: the default policy (3 attempts in all); the server fails 5 times
    result = run_flow(flow(retry=retry), [{"text": "a bug !!500*5!!"}])
    assert result.status == "failed"
    assert len(fake_openai.completions) == requests
    rows = calls(history, result.run_id)
    assert [r.attempt for r in rows] == list(range(1, requests + 1))
    assert {r.status for r in rows} == {"error"} and sum(r.cost_usd for r in rows) == 0
    (item,) = history.items(result.run_id)
    assert item.outcome == "failed"
    assert f"gave up after {requests} attempt(s)" in item.reason and "500" in item.reason


def test_max_retries_points_to_the_retry_policy(llm_plugins, tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(
        "steps:\n  - id: f\n    uses: file.fetch\n    with: {path: x.jsonl}\n"
        "  - id: m\n    uses: openai.transform\n    with:\n      instructions: hi\n      max_retries: 4\n"
    )
    with pytest.raises(WorkflowFileError) as caught:
        load_workflow(path, llm_plugins)
    text = str(caught.value)
    assert "retry: {attempts: 5}" in text and str(path) + ":9:" in text


def test_an_unreachable_api_names_the_error_even_when_it_says_nothing() -> None:
    import httpx
    import openai

    from automator_standard.openai_client import failure

    lost = openai.APIConnectionError(request=httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions"))
    lost.__cause__ = httpx.ReadError("")  # str() is empty
    failed = failure(lost)
    assert failed is not None and failed.retryable
    assert failed.message == "cannot reach the API: ReadError"


def test_an_answer_quoting_a_secret_is_redacted_before_it_is_kept(
    fake_openai: FakeOpenAI, run_flow, history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOMATOR_SECRET_HELPDESK_TOKEN", "hd-7731-secret")
    text = flow(concurrency=1).replace(
        'input: "{{ item.text }}"', 'input: "{{ secrets.HELPDESK_TOKEN }} {{ item.text }}"'
    ) + ("  - id: save\n    uses: file.deliver\n    with: {path: out.jsonl}\n")
    # the fake model echoes the start of the prompt in `summary`: it quotes the token
    result = run_flow(text, [{"text": "login fails"}, {"text": "login fails"}])
    assert result.status == "succeeded", result.error
    answers = [i.result for i in history.items(result.run_id)]
    assert all(a["summary"] == "*** login fails" for a in answers), answers
    assert len(fake_openai.completions) == 1  # the second item took the (redacted) answer
    history.close()
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"hd-7731-secret" not in written
    assert Decimal(0) < fake_openai.billed_usd()
