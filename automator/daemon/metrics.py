"""Prometheus series of the daemon, all prefixed ``automator_``, and what feeds them.

Counters count from the daemon's start, as Prometheus expects; the run history holds
the totals. Model usage is read from the history's ``model_calls`` table incrementally
(by id), so it includes every model call whichever step type made it. A call's row is
written ``sent`` before its request leaves and gets its result later: such a row is
counted once, when it has its result (``ok``, ``error``, ``rejected``, or ``unconfirmed`` at
its upper bound after a crash), and looked at again until then.
"""

from __future__ import annotations

import time
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from automator.history.protocols import ModelCallStore
from automator.history.states import FINAL_OUTCOMES, CallStatus
from automator.plugins.events import RunFinished, StepFinished
from automator.plugins.hookspecs import hookimpl

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes
        self.up = Gauge("automator_daemon_up", "1 while the daemon's scheduler is running.", registry=registry)
        self.start_time = Gauge(
            "automator_daemon_start_time_seconds", "When the daemon started (Unix time).", registry=registry
        )
        self.workflows = Gauge("automator_workflows", "Workflows loaded and scheduled.", registry=registry)
        self.invalid_files = Gauge(
            "automator_invalid_workflow_files", "Workflow files whose current text is invalid.", registry=registry
        )
        self.reloads = Counter(
            "automator_workflow_reloads", "Workflow files (re)loaded, by result.", ["result"], registry=registry
        )
        self.runs = Counter(
            "automator_runs", "Runs finished, by workflow and status.", ["workflow", "status"], registry=registry
        )
        self.run_duration = Histogram(
            "automator_run_duration_seconds",
            "How long runs took.",
            ["workflow"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.step_duration = Histogram(
            "automator_step_duration_seconds",
            "How long steps took, by workflow, step and status.",
            ["workflow", "step", "status"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.items = Counter("automator_items", "Items by final outcome.", ["workflow", "outcome"], registry=registry)
        self.fires = Counter(
            "automator_fires", "Fires, by workflow and trigger.", ["workflow", "trigger"], registry=registry
        )
        self.skipped = Counter(
            "automator_skipped_fires",
            "Fires not run, by workflow and reason.",
            ["workflow", "reason"],
            registry=registry,
        )
        self.lag = Histogram(
            "automator_schedule_lag_seconds",
            "From a scheduled fire's time to its run starting.",
            ["workflow"],
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.active = Gauge("automator_active_runs", "Runs in progress, by workflow.", ["workflow"], registry=registry)
        self.queued = Gauge("automator_queued_fires", "Fires waiting for a free run slot.", registry=registry)
        self.recoveries = Counter(
            "automator_crashed_runs",
            "Runs found with their owner gone, by workflow and what was done (resumed, failed).",
            ["workflow", "action"],
            registry=registry,
        )
        self.pruned = Counter("automator_retention_pruned_runs", "Runs removed by retention.", registry=registry)
        self.housekeeping_rounds = Counter(
            "automator_housekeeping_rounds",
            "Rounds of the housekeeping loop (reload, manual triggers, recovery); a live daemon counts on.",
            registry=registry,
        )
        self.model_calls = Counter(
            "automator_model_calls",
            "Model calls, by workflow, model and status.",
            ["workflow", "model", "status"],
            registry=registry,
        )
        self.model_tokens = Counter(
            "automator_model_tokens",
            "Model tokens, by workflow, model and kind (input, cached_input, output).",
            ["workflow", "model", "kind"],
            registry=registry,
        )
        self.model_cost = Counter(
            "automator_model_cost_usd", "Model cost in US dollars.", ["workflow", "model"], registry=registry
        )
        self.start_time.set(time.time())
        self._model_call_seen: int | None = None
        self._model_calls_in_flight: set[int] = set()  # rows seen ``sent``: counted when they end

    # -- model usage from the history -------------------------------------------------

    def read_model_usage(self, store: ModelCallStore) -> None:
        """Add the model calls recorded since the last look (the first look only sets the mark)."""
        if self._model_call_seen is None:
            self._model_call_seen = store.last_call_id()
            return
        again = sorted(self._model_calls_in_flight)
        for call in store.calls_after(self._model_call_seen, limit=10000, also=again):
            self._model_call_seen = max(self._model_call_seen, call.id)
            if call.status == CallStatus.SENT:
                self._model_calls_in_flight.add(call.id)
                continue
            self._model_calls_in_flight.discard(call.id)
            self.model_calls.labels(call.workflow, call.model, call.status).inc()
            if call.status == CallStatus.CACHED:
                continue  # answered from the response cache: no tokens were paid for
            self.model_tokens.labels(call.workflow, call.model, "input").inc(call.input_tokens or 0)
            self.model_tokens.labels(call.workflow, call.model, "cached_input").inc(call.cached_input_tokens or 0)
            self.model_tokens.labels(call.workflow, call.model, "output").inc(call.output_tokens or 0)
            self.model_cost.labels(call.workflow, call.model).inc(float(Decimal(str(call.cost_usd or 0))))


class MetricsObserver:
    """Lifecycle observer feeding the run, step and item series."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    @hookimpl
    def run_finished(self, event: RunFinished) -> None:
        m, workflow = self.metrics, event.run.workflow
        m.runs.labels(workflow, event.status).inc()
        m.run_duration.labels(workflow).observe(event.duration_s)
        for outcome in FINAL_OUTCOMES:
            if event.counts.get(outcome):
                m.items.labels(workflow, outcome).inc(event.counts[outcome])

    @hookimpl
    def step_finished(self, event: StepFinished) -> None:
        self.metrics.step_duration.labels(event.run.workflow, event.step_id, event.status).observe(event.duration_s)
