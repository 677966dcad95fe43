"""openai.transform with mode: batch: JSONL up, batch polled, answers back, half price, resumable."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select

from automator.engine.runner import Run
from automator.history.llm_models import ModelBatch
from automator.history.models import ModelCall
from automator.history.store import History
from automator.spec.loader import load_workflow
from tests.llm.fake_openai import FakeOpenAI

FLOW = """
name: batched
steps:
  - id: tickets
    uses: file.fetch
    with: {{path: items.jsonl}}
    key: "{{{{ item.id }}}}"
  - id: classify
    uses: openai.transform
    with:
      mode: batch
      batch_poll_interval: 50ms
      instructions: "{instructions}"
      input: "{{{{ item.text }}}}"
      output:
        schema:
          category: [billing, bug, other]
        into: triage
      max_output_tokens: 50
      max_repairs: {repairs}
      {extra}
"""

# the Batch API's prices: half of $0.15 / $0.075 / $0.60 per 1M tokens
BATCH_INPUT, BATCH_CACHED, BATCH_OUTPUT = Decimal("0.075"), Decimal("0.0375"), Decimal("0.30")
NANO = Decimal("0.000000001")


def flow(*, repairs: int = 1, extra: str = "", instructions: str = "Classify the ticket.") -> str:
    return FLOW.format(repairs=repairs, extra=extra, instructions=instructions)


def tickets(*texts: str, first: int = 0) -> list[dict[str, object]]:
    return [{"id": n, "text": text} for n, text in enumerate(texts, start=first)]


def calls(history: History, run_id: int) -> list[ModelCall]:
    with history.session() as session:
        return list(session.scalars(select(ModelCall).where(ModelCall.run_id == run_id).order_by(ModelCall.id)))


def batches(history: History, run_id: int) -> list[ModelBatch]:
    with history.session() as session:
        return list(session.scalars(select(ModelBatch).where(ModelBatch.run_id == run_id).order_by(ModelBatch.id)))


def outcomes(history: History, run_id: int) -> dict[int, tuple[str, str | None]]:
    return {row.seq: (row.outcome, row.reason) for row in history.items(run_id)}


def uploads(fake: FakeOpenAI) -> list[dict[str, object]]:
    return [r for r in fake.requests if r["path"] == "/v1/files"]


def test_items_go_through_one_batch_at_half_price(fake_openai: FakeOpenAI, run_flow, history) -> None:
    # instructions over 1,024 tokens: later requests hit the provider's prefix cache (billed at half again)
    long_instructions = "Classify the ticket into billing, bug or other. " * 120
    result = run_flow(flow(instructions=long_instructions), tickets("billing: charged twice", "a bug", "hello"))
    assert result.status == "succeeded", result.error
    assert result.counts["delivered"] == 3
    answers = {row.seq: row.result["triage"]["category"] for row in history.items(result.run_id)}
    assert answers == {0: "billing", 1: "bug", 2: "billing"}  # the fake takes the first enum value named

    assert fake_openai.completions == []  # nothing went through the sync path
    (creation,) = fake_openai.batch_creations
    assert creation["body"]["endpoint"] == "/v1/chat/completions"
    assert creation["body"]["completion_window"] == "24h"
    (upload,) = uploads(fake_openai)
    assert upload["body"] == {"purpose": "batch"}
    (batch,) = fake_openai.batches.values()
    ids = [line["custom_id"] for line in batch.lines]
    assert ids == [f"run-{result.run_id}-item-{seq}" for seq in range(3)]
    assert all(line["url"] == "/v1/chat/completions" and line["method"] == "POST" for line in batch.lines)
    assert batch.lines[0]["body"]["response_format"]["json_schema"]["strict"] is True

    (stored,) = batches(history, result.run_id)
    assert stored.batch_id == batch.data["id"] and stored.status == "collected" and stored.request_count == 3
    assert stored.output_file_id == batch.data["output_file_id"]

    # the cost of every answer, from the usage the server reported, at Batch API prices
    usage = {
        line["custom_id"]: line["response"]["body"]["usage"]
        for line in map(json.loads, fake_openai.files[batch.data["output_file_id"]].decode().splitlines())
    }
    rows = calls(history, result.run_id)
    assert [(r.mode, r.status) for r in rows] == [("batch", "ok")] * 3
    total = Decimal(0)
    for row in rows:
        reported = usage[f"run-{result.run_id}-item-{row.item_seq}"]
        cached = reported["prompt_tokens_details"]["cached_tokens"]
        assert (row.input_tokens, row.cached_input_tokens, row.output_tokens) == (
            reported["prompt_tokens"],
            cached,
            reported["completion_tokens"],
        )
        expected = (
            (reported["prompt_tokens"] - cached) * BATCH_INPUT
            + cached * BATCH_CACHED
            + reported["completion_tokens"] * BATCH_OUTPUT
        ) / 1_000_000
        assert row.cost_usd == expected.quantize(NANO)
        total += row.cost_usd
    assert sum(r.cached_input_tokens for r in rows) > 0  # the half-price cached input was exercised
    step_usage = history.model_usage(result.run_id)["classify"]
    assert step_usage["calls"] == 3
    assert Decimal(str(step_usage["cost_usd"])) == total
    assert any("1 batch(es) at Batch API prices" in text for _, text in result.summaries)


def test_errors_refusals_and_schema_breaks_each_end_in_their_outcome(
    fake_openai: FakeOpenAI, run_flow, history
) -> None:
    items = tickets("a bug", "x !!500!!", "y !!refuse!!", "billing !!badschema*1!!")
    result = run_flow(flow(repairs=1), items)
    assert result.status == "failed"  # an item failed
    ended = outcomes(history, result.run_id)
    assert ended[0][0] == "delivered"
    assert ended[1][0] == "failed" and "the Batch API answered 500: injected 500" in (ended[1][1] or "")
    assert ended[2][0] == "quarantined" and "refused" in (ended[2][1] or "")
    assert ended[3][0] == "delivered"  # re-asked through the sync path, answered well
    assert history.items(result.run_id, ["delivered"])[1].result["triage"] == {"category": "billing"}

    # re-asks went through chat completions, once each for the refusal and the schema break
    assert len(fake_openai.completions) == 2
    assert len(fake_openai.batch_creations) == 1
    by_item: dict[int, list[tuple[str, str]]] = {}
    for row in calls(history, result.run_id):
        by_item.setdefault(row.item_seq, []).append((row.mode, row.status))
    assert by_item == {
        0: [("batch", "ok")],
        1: [("batch", "error")],
        2: [("batch", "rejected"), ("sync", "rejected")],
        3: [("batch", "rejected"), ("sync", "ok")],
    }
    rejected = [r for r in calls(history, result.run_id) if r.item_seq == 3]
    assert rejected[0].cost_usd > 0  # the batch answer was paid for, at batch prices
    assert rejected[0].cost_usd == (
        (rejected[0].input_tokens * BATCH_INPUT + rejected[0].output_tokens * BATCH_OUTPUT) / 1_000_000
    ).quantize(NANO)


def test_without_repairs_a_rejected_batch_answer_is_quarantined(fake_openai: FakeOpenAI, run_flow, history) -> None:
    result = run_flow(flow(repairs=0), tickets("a bug", "cut !!length!!", "bad !!badjson!!"))
    ended = outcomes(history, result.run_id)
    assert ended[0][0] == "delivered"
    assert ended[1][0] == "quarantined" and "cut off at max_output_tokens (50)" in (ended[1][1] or "")
    assert ended[2][0] == "quarantined" and "not valid JSON" in (ended[2][1] or "")
    assert fake_openai.completions == []


def test_runs_over_the_limits_are_split_into_several_batches(
    fake_openai: FakeOpenAI, run_flow, history, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_flow(flow(extra="batch_max_requests: 2"), tickets(*(f"bug {n}" for n in range(5))))
    assert result.counts["delivered"] == 5
    sizes = sorted(len(b.lines) for b in fake_openai.batches.values())
    assert sizes == [1, 2, 2]
    assert [b.request_count for b in batches(history, result.run_id)] == [2, 2, 1]
    assert len(uploads(fake_openai)) == 3

    # and by size: input files of at most two requests' bytes (the same template, similar items)
    from automator_standard import openai_batch

    uploaded = [fake_openai.files[b.data["input_file_id"]] for b in fake_openai.batches.values()]
    longest = max(len(line) + 1 for data in uploaded for line in data.splitlines())
    monkeypatch.setattr(openai_batch, "MAX_FILE_BYTES", 2 * longest + 1)
    fake_openai.reset()
    again = run_flow(flow(), tickets(*(f"bug {n}" for n in range(5, 10)), first=5))
    assert again.counts["delivered"] == 5
    assert sorted(len(b.lines) for b in fake_openai.batches.values()) == [1, 2, 2]
    assert all(len(fake_openai.files[b.data["input_file_id"]]) <= 2 * longest + 1 for b in fake_openai.batches.values())


@pytest.mark.parametrize("end", ["failed", "expired"])
def test_a_batch_that_fails_or_expires_fails_its_unanswered_items(
    fake_openai: FakeOpenAI, run_flow, history, end: str
) -> None:
    fake_openai.batch_end = end
    result = run_flow(flow(), tickets("bug 1", "bug 2", "bug 3", "bug 4"))
    assert result.status == "failed"
    ended = outcomes(history, result.run_id)
    failed = [reason or "" for outcome, reason in ended.values() if outcome == "failed"]
    if end == "failed":
        assert len(failed) == 4
        assert all("the batch ended failed (invalid_request: injected batch failure)" in r for r in failed)
    else:
        assert result.counts["delivered"] == 2 and len(failed) == 2
        assert all("batch_expired" in r for r in failed)
    (stored,) = batches(history, result.run_id)
    assert stored.status == "collected" and (stored.error or "").startswith(end)
    assert fake_openai.completions == []


RUN_ONE = """
import asyncio, sys
from automator.engine.runner import run_workflow
from automator.history.store import History
from automator.plugins.manager import load_plugins
from automator.spec.loader import load_workflow

plugins = load_plugins(None)
asyncio.run(run_workflow(load_workflow(sys.argv[1], plugins), History(sys.argv[2]), plugins))
"""


def test_a_batch_is_collected_after_a_restart_not_submitted_again(
    fake_openai: FakeOpenAI, history: History, history_url: str, llm_plugins, tmp_path: Path
) -> None:
    folder = tmp_path / "wf"
    folder.mkdir()
    (folder / "items.jsonl").write_text(
        "".join(json.dumps(t) + "\n" for t in tickets("billing", "a bug", "other")), encoding="utf-8"
    )
    path = folder / "flow.yaml"
    path.write_text(textwrap.dedent(flow()).lstrip("\n"), encoding="utf-8")
    fake_openai.batch_delay_s = 2.0  # still running when the first process dies

    # process 1 submits the batch and is killed while it waits
    first = subprocess.Popen([sys.executable, "-c", RUN_ONE, str(path), history_url], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 15
        stored: list[ModelBatch] = []
        while not stored:
            assert first.poll() is None, "the first process ended on its own"
            assert time.monotonic() < deadline, "no batch was stored"
            time.sleep(0.02)
            with history.session() as session:
                # created: the row written ahead of the create call has its batch id now
                stored = list(session.scalars(select(ModelBatch).where(ModelBatch.batch_id.is_not(None))))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    (row,) = stored
    assert row.status in ("validating", "in_progress")
    run_id = row.run_id
    assert run_id is not None
    assert history.get_run(run_id).status == "running"  # it died: nothing ended it
    assert {r.outcome for r in history.items(run_id)} == {"pending"}
    assert len(fake_openai.batch_creations) == 1

    # process 2 (here) resumes the run: it finds the stored batch and polls it
    workflow = load_workflow(path, llm_plugins)
    result = asyncio.run(Run(workflow, history, llm_plugins).resume(run_id))
    assert result.status == "succeeded", result.error
    assert result.counts["delivered"] == 3
    assert len(fake_openai.batch_creations) == 1  # no second submission, no second payment
    assert len(uploads(fake_openai)) == 1
    assert fake_openai.completions == []
    (after,) = batches(history, run_id)
    assert after.batch_id == row.batch_id and after.status == "collected"
    assert [(c.mode, c.status) for c in calls(history, run_id)] == [("batch", "ok")] * 3


DECOY = "not-these-requests"


def write_flow(tmp_path: Path, text: str, items: list[dict[str, object]]) -> Path:
    folder = tmp_path / "wf"
    folder.mkdir(exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(t) + "\n" for t in items), encoding="utf-8")
    path = folder / "flow.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.mark.parametrize("killed_at", [1, 2])
def test_a_batch_created_just_before_a_crash_is_adopted_not_paid_twice(
    fake_openai: FakeOpenAI,
    history: History,
    history_url: str,
    llm_plugins,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    killed_at: int,
) -> None:
    # five items in batches of two: three batches; the process dies as batch `killed_at` is created
    path = write_flow(tmp_path, flow(extra="batch_max_requests: 2"), tickets(*(f"bug {n}" for n in range(5))))
    process: list[subprocess.Popen[bytes]] = []

    def crash(batch: dict[str, object]) -> None:
        # the batch exists on the server; its creator dies before it can store the id
        if len(fake_openai.batch_creations) == killed_at:
            process[0].send_signal(signal.SIGKILL)
            process[0].wait()

    fake_openai.on_batch_created = crash
    process.append(subprocess.Popen([sys.executable, "-c", RUN_ONE, str(path), history_url], env=os.environ.copy()))
    try:
        assert process[0].wait(timeout=20) == -signal.SIGKILL
    finally:
        if process[0].poll() is None:
            process[0].kill()
    fake_openai.on_batch_created = None
    created = [b.data["id"] for b in fake_openai.batches.values()]
    assert len(created) == killed_at
    with history.session() as session:
        stored = list(session.scalars(select(ModelBatch)))
    # the window: the last batch exists on OpenAI, and the history has only the intent to create it
    assert sorted(r.batch_id for r in stored if r.batch_id) == sorted(created[: killed_at - 1])
    assert [r.status for r in stored if not r.batch_id] == ["creating"]
    (run,) = history.list_runs()
    assert run.status == "running"

    # others' batches, newer than ours, which the search must pass over (pages of one: `after` is used)
    import openai

    from automator_standard import openai_batch

    sdk = openai.OpenAI(base_url=fake_openai.base_url, api_key="sk-decoy", max_retries=0)
    upload = sdk.files.create(file=("decoy.jsonl", b""), purpose="batch")
    for tags in (
        {"automator_run": str(run.id + 1), "automator_step": "classify", "automator_input": DECOY},
        {"automator_run": str(run.id), "automator_step": "classify", "automator_input": DECOY},
    ):
        sdk.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", metadata=tags
        )
    monkeypatch.setattr(openai_batch, "LIST_PAGE", 1)

    result = asyncio.run(Run(load_workflow(path, llm_plugins), history, llm_plugins).resume(run.id))
    assert result.status == "succeeded", result.error
    assert result.counts["delivered"] == 5

    ours = [c for c in fake_openai.batch_creations if c["body"]["metadata"]["automator_input"] != DECOY]
    assert len(ours) == 3  # one creation per batch, the crashed one not sent again
    assert len(uploads(fake_openai)) == 3 + 1  # nor its input uploaded again (+1: the decoys')
    sent = [
        line["custom_id"]
        for b in fake_openai.batches.values()
        if b.data["metadata"]["automator_input"] != DECOY
        for line in b.lines
    ]
    assert sorted(sent) == sorted(f"run-{run.id}-item-{seq}" for seq in range(5))  # each item once
    rows = batches(history, run.id)
    assert len(rows) == 3 and all(r.status == "collected" for r in rows)
    assert created[-1] in {r.batch_id for r in rows}  # adopted: its row written by the resumed run
    assert DECOY not in {fake_openai.batches[r.batch_id].data["metadata"]["automator_input"] for r in rows}
    assert any("after" in listing["query"] for listing in fake_openai.batch_listings)
    assert sorted((c.item_seq, c.mode, c.status) for c in calls(history, run.id)) == [
        (seq, "batch", "ok") for seq in range(5)
    ]
    assert any("1 batch(es) created before a restart picked up" in text for _, text in result.summaries)


def test_after_a_restart_unusable_answers_of_a_collected_batch_are_not_sent_again(
    fake_openai: FakeOpenAI, history: History, history_url: str, llm_plugins, tmp_path: Path
) -> None:
    # batch 1: an error line and a cut-off answer (quarantined: no repairs); batch 2 still running
    items = tickets("x !!500!!", "cut !!length!!", "a bug", "billing")
    path = write_flow(tmp_path, flow(repairs=0, extra="batch_max_requests: 2"), items)

    def slow_second(batch: dict[str, object]) -> None:
        if len(fake_openai.batch_creations) == 2:
            fake_openai.batch_delay_s = 2.0

    fake_openai.on_batch_created = slow_second
    first = subprocess.Popen([sys.executable, "-c", RUN_ONE, str(path), history_url], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 15
        collected: list[ModelBatch] = []
        while not collected:  # batch 1 collected, batch 2 waited for: the process dies now
            assert first.poll() is None, "the first process ended on its own"
            assert time.monotonic() < deadline, "batch 1 was not collected"
            time.sleep(0.02)
            with history.session() as session:
                collected = list(session.scalars(select(ModelBatch).where(ModelBatch.status == "collected")))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    fake_openai.on_batch_created = None
    (run,) = history.list_runs()
    assert {r.outcome for r in history.items(run.id)} == {"pending"}  # outcomes come when the step ends
    assert len(fake_openai.batch_creations) == 2

    result = asyncio.run(Run(load_workflow(path, llm_plugins), history, llm_plugins).resume(run.id))
    ended = outcomes(history, run.id)
    assert ended[0][0] == "failed" and "the Batch API answered 500: injected 500" in (ended[0][1] or "")
    assert "not sent again" in (ended[0][1] or "")
    assert ended[1][0] == "quarantined" and "cut off at max_output_tokens (50)" in (ended[1][1] or "")
    assert ended[2][0] == ended[3][0] == "delivered"
    assert result.counts["delivered"] == 2
    assert len(fake_openai.batch_creations) == 2  # no third batch for the two that ended badly
    assert fake_openai.completions == []
    by_item: dict[int, list[tuple[str, str]]] = {}
    for row in calls(history, run.id):
        by_item.setdefault(row.item_seq, []).append((row.mode, row.status))
    assert by_item == {0: [("batch", "error")], 1: [("batch", "rejected")], 2: [("batch", "ok")], 3: [("batch", "ok")]}


def test_a_create_whose_answer_was_lost_is_found_not_sent_again(fake_openai: FakeOpenAI, run_flow, history) -> None:
    fake_openai.lose_batch_create_answers = 1  # the batch is made, the client sees a 500
    result = run_flow(flow(), tickets("billing", "a bug"))
    assert result.status == "succeeded", result.error
    assert len(fake_openai.batch_creations) == 1
    assert len(fake_openai.batch_listings) >= 1  # looked before trying again
    (stored,) = batches(history, result.run_id)
    (batch,) = fake_openai.batches.values()
    assert stored.batch_id == batch.data["id"]
    # a first run does not search before creating
    fake_openai.reset()
    run_flow(flow(), tickets("other", first=10))
    assert fake_openai.batch_listings == [] and len(fake_openai.batch_creations) == 1


def test_the_budget_is_checked_at_batch_prices_before_submitting(fake_openai: FakeOpenAI, run_flow, history) -> None:
    # each request costs at most ~(40 in * 0.075 + 50 out * 0.30) / 1M = $0.000018 at batch prices
    text = flow().replace("name: batched\n", "name: batched\nbudget: {max_cost_usd: 0.00004}\n")
    result = run_flow(text, tickets("bug 1", "bug 2", "bug 3", "bug 4"))
    assert result.counts["delivered"] == 2 and result.counts["failed"] == 2
    assert all(
        "max_cost_usd $0.000040 per run would be passed" in r.reason for r in history.items(result.run_id, ["failed"])
    )
    (batch,) = fake_openai.batches.values()
    assert len(batch.lines) == 2  # the unaffordable ones were never sent
    assert sum(c.cost_usd for c in calls(history, result.run_id)) <= Decimal("0.00004")
