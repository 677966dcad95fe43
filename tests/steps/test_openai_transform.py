"""openai.transform, every setting left out and set, against the fake OpenAI server (a real HTTP server)."""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select

from automator import WorkflowFileError
from automator.history.models import ModelCall
from automator.testing import WorkflowRun, WorkflowRunner
from tests.llm.fake_openai import FakeOpenAI
from tests.steps.coverage import covers

STEP = "openai.transform"
TICKETS = [{"id": 1, "subject": "Refund missing"}, {"id": 2, "subject": "App crashes"}]
SCHEMA = "{category: [billing, bug, other], urgency: integer}"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def transform(runner: WorkflowRunner, settings: str, items: list[Any] = TICKETS, **kwargs: Any) -> WorkflowRun:
    return runner.run(
        f"""
        params: {{shop: Acme}}
        steps:
          - {{id: src, uses: test.fetch, with: {{items: {json.dumps(items)}}}}}
          - id: ai
            uses: openai.transform
            with: {settings}
          - {{id: out, uses: test.deliver}}
        """,
        **kwargs,
    )


def model_calls(runner: WorkflowRunner, run_id: int) -> list[ModelCall]:
    with runner.history.session() as session:
        return list(session.scalars(select(ModelCall).where(ModelCall.run_id == run_id).order_by(ModelCall.id)))


def bodies(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [r["body"] for r in fake.completions]


@covers(STEP, "instructions", absent=True)
def test_instructions_are_required(automator_runner: WorkflowRunner) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(
            "steps:\n  - {id: src, uses: test.fetch}\n  - {id: ai, uses: openai.transform, with: {model: gpt-4o-mini}}\n"
        )

    assert any(
        "missing required key 'with.instructions'" in p.message or "instructions" in p.message
        for p in caught.value.problems
    )


@covers(
    STEP,
    "instructions",
    absent=False,
)
@covers(
    STEP,
    "model",
    "input",
    "images",
    "examples",
    "output",
    "output.schema",
    "output.into",
    "max_output_tokens",
    "temperature",
    "mode",
    "rpm",
    "tpm",
    "max_retries",
    "store_prompts",
    "base_url",
    "api_key",
    "prices",
    "context_window",
    "prompt_cache_key",
    absent=True,
)
def test_with_only_instructions_each_item_is_sent_as_json_and_the_answer_text_kept(
    automator_runner: WorkflowRunner, fake_openai: FakeOpenAI
) -> None:
    fake_openai.api_key = "sk-test-9f8e7d6c5b4a39281706f5e4d3c2b1a0"  # what OPENAI_API_KEY holds

    result = transform(automator_runner, '{instructions: "You triage tickets for {{ params.shop }}."}')

    assert result.status == "succeeded", result.error
    body = bodies(fake_openai)[0]
    assert body["model"] == "gpt-4o-mini"  # model
    assert body["messages"][0] == {"role": "system", "content": "You triage tickets for Acme."}
    # input: the item as JSON; images: none, so the content is plain text; examples: none
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert json.loads(body["messages"][1]["content"]) in TICKETS
    assert body.get("max_tokens", body.get("max_completion_tokens")) == 1024  # max_output_tokens
    assert body["temperature"] == 0  # temperature
    assert "response_format" not in body and "prompt_cache_key" not in body  # output.schema, prompt_cache_key
    # output.into: null and no schema -> the item is kept, the answer's text under `text`
    assert [set(i) for i in result.delivered["out"]] == [{"id", "subject", "text"}] * 2
    assert all(i["text"].startswith("echo: ") for i in result.delivered["out"])
    calls = model_calls(automator_runner, result.run.id)
    assert [c.mode for c in calls] == ["sync", "sync"] and not fake_openai.batch_creations  # mode: sync
    assert all(c.prompt is None and c.response is None for c in calls)  # store_prompts: false
    # prices, context_window: gpt-4o-mini's from the seed table
    assert (
        calls[0].cost_usd
        == Decimal(calls[0].input_tokens) * Decimal("0.15") / 10**6
        + Decimal(calls[0].output_tokens) * Decimal("0.60") / 10**6
    )
    # api_key/base_url: $OPENAI_API_KEY and $OPENAI_BASE_URL; rpm/tpm: no pacing of our own
    assert {r["authorization"] for r in fake_openai.completions} == {f"Bearer {fake_openai.api_key}"}
    assert "waited" not in (result.step("ai").summary or "")


@covers(
    STEP,
    "model",
    "input",
    "max_output_tokens",
    "temperature",
    "prompt_cache_key",
    "prices",
    "prices.input",
    "prices.cached_input",
    "prices.output",
    "context_window",
    absent=False,
)
def test_model_prompt_and_pricing_settings(automator_runner: WorkflowRunner, fake_openai: FakeOpenAI) -> None:
    result = transform(
        automator_runner,
        """{instructions: Classify., model: acme-small, input: "Subject: {{ item.subject }}",
            max_output_tokens: 50, temperature: 0.5, prompt_cache_key: tickets-v1, context_window: 8000,
            prices: {input: 1.00, cached_input: 0.50, output: 2.00}}""",
    )

    assert result.status == "succeeded", result.error
    body = bodies(fake_openai)[0]
    assert body["model"] == "acme-small"
    assert body["messages"][1]["content"] in ("Subject: Refund missing", "Subject: App crashes")
    assert body.get("max_tokens", body.get("max_completion_tokens")) == 50
    assert body["temperature"] == 0.5
    assert body["prompt_cache_key"] == "tickets-v1"
    [call, *_] = model_calls(automator_runner, result.run.id)
    assert call.cost_usd == (Decimal(call.input_tokens) * 1 + Decimal(call.output_tokens) * 2) / 10**6


@covers(STEP, "prices.input", "prices.cached_input", "prices.output", absent=True)
def test_prices_need_all_three(automator_runner: WorkflowRunner) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(
            "steps:\n  - {id: src, uses: test.fetch}\n"
            "  - {id: ai, uses: openai.transform, with: {instructions: x, model: acme, prices: {}}}\n"
        )

    text = " ".join(p.message for p in caught.value.problems)
    assert all(name in text for name in ("input", "cached_input", "output"))


@covers(STEP, "context_window", absent=False)
def test_a_prompt_past_the_context_window_is_quarantined_unsent(
    automator_runner: WorkflowRunner, fake_openai: FakeOpenAI
) -> None:
    result = transform(automator_runner, "{instructions: Classify., context_window: 20, max_output_tokens: 10}")

    assert result.outcomes["quarantined"] == 2
    assert not fake_openai.completions


@covers(STEP, "output", "output.schema", "output.name", "output.into", absent=False)
@covers(STEP, "output.name", absent=True)
def test_structured_output_replaces_or_joins_the_item(
    automator_runner: WorkflowRunner, fake_openai: FakeOpenAI
) -> None:
    tickets = [{"id": 1, "subject": "a billing question"}, {"id": 2, "subject": "a bug in the app"}]
    replaced = transform(automator_runner, f"{{instructions: Classify., output: {{schema: {SCHEMA}}}}}", tickets)
    joined = transform(
        automator_runner,
        f"{{instructions: Classify., output: {{schema: {SCHEMA}, name: triage, into: triage}}}}",
        tickets,
    )

    first, second = bodies(fake_openai)[0], bodies(fake_openai)[-1]
    assert first["response_format"]["json_schema"]["name"] == "result"  # output.name's default
    assert second["response_format"]["json_schema"]["name"] == "triage"
    assert sorted(replaced.delivered["out"], key=json.dumps) == [
        {"category": "billing", "urgency": 1},
        {"category": "bug", "urgency": 1},
    ]
    assert {i["id"]: i["triage"]["category"] for i in joined.delivered["out"]} == {1: "billing", 2: "bug"}


@covers(STEP, "output.into", absent=False)
def test_a_text_answer_goes_under_into(automator_runner: WorkflowRunner, fake_openai: FakeOpenAI) -> None:
    result = transform(automator_runner, "{instructions: Summarise., output: {into: summary}}")

    assert all(set(i) == {"id", "subject", "summary"} for i in result.delivered["out"])


@covers(STEP, "images", "images[].url", "images[].path", "images[].detail", absent=False)
@covers(STEP, "images[].url", "images[].path", "images[].detail", absent=True)
def test_images_by_url_path_and_detail(automator_runner: WorkflowRunner, fake_openai: FakeOpenAI) -> None:
    automator_runner.write("photos/1.png", PNG)

    result = transform(
        automator_runner,
        """{instructions: Describe., images: [
              "https://img.example.com/{{ item.id }}.png",
              {path: "photos/{{ item.id }}.png", detail: low}]}""",
        items=TICKETS[:1],
    )

    assert result.status == "succeeded", result.error
    content = bodies(fake_openai)[0]["messages"][-1]["content"]
    images = [part["image_url"] for part in content if part["type"] == "image_url"]
    # a plain string is the url; a mapping without detail gets auto
    assert images[0] == {"url": "https://img.example.com/1.png", "detail": "auto"}
    assert images[1]["url"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert images[1]["detail"] == "low"


@covers(STEP, "examples", "examples[].input", "examples[].output", absent=False)
def test_examples_come_between_instructions_and_the_item(
    automator_runner: WorkflowRunner, fake_openai: FakeOpenAI
) -> None:
    transform(
        automator_runner,
        f"""{{instructions: Classify., output: {{schema: {SCHEMA}}},
             examples: [{{input: "Where is my refund?", output: {{category: billing, urgency: 3}}}}]}}""",
        items=TICKETS[:1],
    )

    messages = bodies(fake_openai)[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "Where is my refund?"
    assert json.loads(messages[2]["content"]) == {"category": "billing", "urgency": 3}


@covers(STEP, "examples[].input", "examples[].output", absent=True)
def test_an_example_needs_input_and_output(automator_runner: WorkflowRunner) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(
            "steps:\n  - {id: src, uses: test.fetch}\n"
            "  - {id: ai, uses: openai.transform, with: {instructions: x, examples: [{}]}}\n"
        )

    text = " ".join(p.message for p in caught.value.problems)
    assert "input" in text and "output" in text


@covers(STEP, "cache", absent=True)
@covers(STEP, "cache", absent=False)
def test_the_response_cache_is_on_at_temperature_zero_unless_turned_off(
    automator_runner: WorkflowRunner, fake_openai: FakeOpenAI
) -> None:
    transform(automator_runner, "{instructions: Classify.}", items=TICKETS[:1])
    transform(automator_runner, "{instructions: Classify.}", items=TICKETS[:1])
    cached = len(fake_openai.completions)
    transform(automator_runner, "{instructions: Classify., cache: false}", items=TICKETS[:1])

    assert cached == 1  # the second run was answered from the cache
    assert len(fake_openai.completions) == 2


@covers(STEP, "mode", "batch_poll_interval", "batch_max_requests", absent=False)
def test_batch_mode_splits_and_polls(automator_runner: WorkflowRunner, fake_openai: FakeOpenAI) -> None:
    fake_openai.batch_delay_s = 0.3
    items = [{"id": n, "subject": f"ticket {n}"} for n in range(3)]

    result = transform(
        automator_runner,
        "{instructions: Classify., mode: batch, batch_max_requests: 2, batch_poll_interval: 50ms}",
        items,
    )

    assert result.status == "succeeded", result.error
    assert len(fake_openai.batch_creations) == 2  # 3 requests, at most 2 a batch
    assert not fake_openai.completions
    assert result.outcomes["delivered"] == 3
    # not done at the first look: the next came 50ms later, not after the 30s default
    assert result.result.duration_s < 10


@covers(STEP, "batch_poll_interval", "batch_max_requests", absent=True)
def test_batch_mode_defaults_put_every_request_in_one_batch(
    automator_runner: WorkflowRunner, fake_openai: FakeOpenAI
) -> None:
    fake_openai.batch_delay_s = 0.0  # done at the first look: the 30s poll interval is never waited
    items = [{"id": n, "subject": f"ticket {n}"} for n in range(3)]

    result = transform(automator_runner, "{instructions: Classify., mode: batch}", items)

    assert result.status == "succeeded", result.error
    assert len(fake_openai.batch_creations) == 1


@covers(STEP, "max_repairs", absent=True)
@covers(STEP, "max_repairs", absent=False)
def test_a_cut_off_answer_is_asked_again_up_to_max_repairs(
    automator_runner: WorkflowRunner, fake_openai: FakeOpenAI
) -> None:
    item = [{"id": 1, "subject": "Refund !!length*2!!"}]
    repaired = transform(automator_runner, "{instructions: Classify., cache: false}", item)
    asked_default = len(fake_openai.completions)
    strict = transform(
        automator_runner,
        "{instructions: Classify., cache: false, max_repairs: 0}",
        [{"id": 1, "subject": "x !!length*1!!"}],
    )

    assert repaired.outcomes["delivered"] == 1 and asked_default == 3  # cut off twice, repaired twice
    assert strict.outcomes["quarantined"] == 1 and len(fake_openai.completions) == asked_default + 1


@covers(STEP, "request_timeout", absent=True)
@covers(STEP, "request_timeout", absent=False)
def test_request_timeout(automator_runner: WorkflowRunner, fake_openai: FakeOpenAI) -> None:
    fake_openai.slow_s = 1.0
    item = [{"id": 1, "subject": "slow !!slow*1!!"}]

    patient = transform(automator_runner, "{instructions: Classify., cache: false}", item)
    hasty = automator_runner.run(
        """
        steps:
          - {id: src, uses: test.fetch, with: {items: [{"id": 1, "subject": "slow !!slow!!"}]}}
          - {id: ai, uses: openai.transform, retry: {attempts: 1}, with: {instructions: Classify., cache: false, request_timeout: 200ms}}
          - {id: out, uses: test.deliver}
        """
    )

    assert patient.outcomes["delivered"] == 1  # a second is well inside the 60s default
    assert hasty.outcomes["failed"] == 1


@covers(STEP, "store_prompts", absent=False)
def test_store_prompts_keeps_prompt_and_answer(automator_runner: WorkflowRunner, fake_openai: FakeOpenAI) -> None:
    result = transform(automator_runner, "{instructions: Classify., store_prompts: true}", items=TICKETS[:1])

    [call] = model_calls(automator_runner, result.run.id)
    assert call.prompt is not None and call.response is not None
    assert "Classify." in json.dumps(call.prompt)


@covers(STEP, "base_url", "api_key", absent=False)
def test_base_url_and_api_key_per_step(
    automator_runner: WorkflowRunner, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    fake_openai.api_key = "sk-step-0123456789abcdef"

    result = transform(
        automator_runner,
        f'{{instructions: Classify., base_url: "{fake_openai.base_url}", api_key: "{{{{ secrets.OAI }}}}"}}',
        items=TICKETS[:1],
        secrets={"OAI": "sk-step-0123456789abcdef"},
    )

    assert result.status == "succeeded", result.error
    assert fake_openai.completions[0]["authorization"] == "Bearer sk-step-0123456789abcdef"


@covers(STEP, "max_retries", absent=False)
def test_max_retries_is_refused_with_the_replacement(automator_runner: WorkflowRunner) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        automator_runner.load(
            "steps:\n  - {id: src, uses: test.fetch}\n"
            "  - {id: ai, uses: openai.transform, with: {instructions: x, max_retries: 4}}\n"
        )

    assert any("retry: {attempts: 5}" in p.message for p in caught.value.problems)


@covers(STEP, "rpm", "tpm", absent=False)
def test_rpm_and_tpm_pace_the_requests(automator_runner: WorkflowRunner, fake_openai: FakeOpenAI) -> None:
    items = [{"id": n, "subject": f"t{n}"} for n in range(62)]

    by_requests = transform(automator_runner, "{instructions: Classify., cache: false, rpm: 60}", items)
    # a request counts its prompt and max_output_tokens (about 2,030): a minute's 120,000 allow ~59 at once
    by_tokens = transform(
        automator_runner, "{instructions: Classify., cache: false, max_output_tokens: 2000, tpm: 120000}", items[:61]
    )

    assert by_requests.outcomes["delivered"] == 62
    assert "waited" in (by_requests.step("ai").summary or "")  # 60 at once, then one a second
    assert by_tokens.outcomes["delivered"] == 61
    assert "waited" in (by_tokens.step("ai").summary or "")
