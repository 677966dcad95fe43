"""The daemon's model series count the model calls the history recorded since it started."""

from __future__ import annotations

from decimal import Decimal

from automator.daemon.metrics import Metrics
from automator.history.states import CallStatus
from automator.history.store import History
from automator.llm.records import now


def record_calls(history: History, *calls: dict[str, object]) -> None:
    rows = []
    for fields in calls:
        # every row with the same columns, as the model-call service writes them
        usage = {"input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0, "cost_usd": Decimal(0), **fields}
        rows.append({"workflow": "triage", "step_id": "classify", "model": "gpt-4o-mini", "created_at": now(), **usage})
    history.model_calls.write_calls(rows, [])


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_model_series_count_calls_recorded_after_the_daemon_started(history: History) -> None:
    # a call from before the daemon started belongs to the history's totals, not to the counters
    record_calls(history, dict(status=CallStatus.OK, input_tokens=900, output_tokens=90, cost_usd=Decimal("0.5")))
    metrics = Metrics()
    metrics.read_model_usage(history.model_calls)

    record_calls(
        history,
        dict(
            status=CallStatus.OK, input_tokens=1000, cached_input_tokens=200, output_tokens=50, cost_usd=Decimal("0.25")
        ),
        dict(status=CallStatus.CACHED, input_tokens=1000, output_tokens=50),
        dict(status=CallStatus.ERROR),
    )
    metrics.read_model_usage(history.model_calls)
    metrics.read_model_usage(history.model_calls)  # a second look adds nothing new

    labels = {"workflow": "triage", "model": "gpt-4o-mini"}
    assert sample(metrics, "automator_model_calls_total", **labels, status="ok") == 1
    assert sample(metrics, "automator_model_calls_total", **labels, status="cached") == 1
    assert sample(metrics, "automator_model_calls_total", **labels, status="error") == 1
    # a cache hit paid nothing: its tokens are not counted
    assert sample(metrics, "automator_model_tokens_total", **labels, kind="input") == 1000
    assert sample(metrics, "automator_model_tokens_total", **labels, kind="cached_input") == 200
    assert sample(metrics, "automator_model_tokens_total", **labels, kind="output") == 50
    assert sample(metrics, "automator_model_cost_usd_total", **labels) == 0.25
