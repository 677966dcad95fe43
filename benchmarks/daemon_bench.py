"""Daemon benchmark: 100 workflows firing every second.

Reports the schedule lag (a run's start minus its scheduled time) p50 and p99, the
daemon's CPU and resident memory over the window, and its memory after 100 runs
against after many (10,000 in the full mode). Runs the real ``automator daemon`` as a
subprocess on a fresh SQLite history; CPU and RSS come from its own /metrics.

    python benchmarks/daemon_bench.py            # 60 s window, RSS at 100 and 10,000 runs
    python benchmarks/daemon_bench.py --quick    # 15 s window, RSS at 100 and 2,000 runs
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from automator.history.models import Run
from automator.history.store import History

WORKFLOW = """\
name: wf{n:03d}
schedule: {{every: 1s}}
steps:
  - id: read
    uses: file.fetch
    with: {{path: items.jsonl}}
  - id: shape
    uses: template.transform
    with: {{mapping: {{id: "{{{{ item.id }}}}", n: {n}}}}}
"""


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _process_metrics(base: str) -> tuple[float, float]:
    """(CPU seconds, resident bytes) of the daemon, from its /metrics."""
    cpu = rss = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "process_cpu_seconds_total":
                cpu = sample.value
            elif sample.name == "process_resident_memory_bytes":
                rss = sample.value
    return cpu, rss


def _count_runs(history: History) -> int:
    with history.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Run).where(Run.status != "running")).scalar() or 0)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def bench(workflows: int, window: float, many_runs: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="automator-bench-") as tmp:
        folder = Path(tmp) / "workflows"
        folder.mkdir()
        (folder / "items.jsonl").write_text('{"id": 1}\n')
        for n in range(workflows):
            (folder / f"wf{n:03d}.yaml").write_text(WORKFLOW.format(n=n))
        url = f"sqlite:///{tmp}/history.db"
        port = _port()
        base = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "daemon.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "automator.cli.main",
                "daemon",
                "--workflows",
                str(folder),
                "--http",
                f"127.0.0.1:{port}",
                "--log-format",
                "json",
                "--max-concurrent-runs",
                "64",
            ],
            env={**os.environ, "AUTOMATOR_DATABASE_URL": url},
            stdout=log,
            stderr=log,
        )
        history = History(url)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the daemon did not start; see its log")
                time.sleep(0.2)
            while _count_runs(history) < 100:
                time.sleep(0.05)
            _, rss_100 = _process_metrics(base)
            cpu_start, _ = _process_metrics(base)
            window_start = time.time()
            time.sleep(window)
            cpu_end, rss_window = _process_metrics(base)
            window_end = time.time()
            while _count_runs(history) < many_runs:
                if proc.poll() is not None:
                    raise SystemExit("the daemon exited; see its log")
                time.sleep(0.5)
            _, rss_many = _process_metrics(base)
            total_runs = _count_runs(history)
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            with history.engine.connect() as conn:
                rows = conn.execute(
                    select(Run.started_at, Run.scheduled_for, Run.status).where(Run.trigger == "schedule")
                ).all()
        finally:
            if proc.poll() is None:
                proc.kill()
            history.close()
            log.close()
    lags = [
        (started - scheduled).total_seconds()
        for started, scheduled, status in rows
        if scheduled is not None and status != "skipped" and window_start <= scheduled.timestamp() <= window_end
    ]
    skipped = sum(1 for _, scheduled, status in rows if status == "skipped")
    return {
        "workflows": workflows,
        "window_s": window,
        "runs_in_window": len(lags),
        "expected_in_window": workflows * window,
        "lag_p50_ms": statistics.median(lags) * 1000 if lags else float("nan"),
        "lag_p99_ms": _percentile(lags, 0.99) * 1000 if lags else float("nan"),
        "lag_max_ms": max(lags) * 1000 if lags else float("nan"),
        "cpu_percent": 100 * (cpu_end - cpu_start) / (window_end - window_start),
        "rss_window_mb": rss_window / 2**20,
        "rss_after_100_mb": rss_100 / 2**20,
        "rss_after_many_mb": rss_many / 2**20,
        "many_runs": total_runs,
        "skipped_fires": skipped,
    }


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
    """The benchmark's table rows; called without arguments (benchmarks/run.py) it runs --quick."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="15 s window, RSS compared at 2,000 runs")
    parser.add_argument("--workflows", type=int, default=100)
    args = parser.parse_args(["--quick"] if argv is None else argv)
    window, many = (15.0, 2000) if args.quick else (60.0, 10000)
    result = bench(args.workflows, window, many)
    return [
        ("workflows firing every second", f"{result['workflows']}"),
        ("window", f"{result['window_s']:.0f} s"),
        ("scheduled runs in window", f"{result['runs_in_window']} ({result['expected_in_window']:.0f} fires due)"),
        ("schedule lag p50", f"{result['lag_p50_ms']:.1f} ms"),
        ("schedule lag p99", f"{result['lag_p99_ms']:.1f} ms"),
        ("schedule lag max", f"{result['lag_max_ms']:.1f} ms"),
        ("fires skipped (queue full)", f"{result['skipped_fires']}"),
        ("daemon CPU (one core = 100%)", f"{result['cpu_percent']:.0f} %"),
        ("daemon RSS in window", f"{result['rss_window_mb']:.1f} MiB"),
        ("daemon RSS after 100 runs", f"{result['rss_after_100_mb']:.1f} MiB"),
        (f"daemon RSS after {result['many_runs']:,} runs", f"{result['rss_after_many_mb']:.1f} MiB"),
    ]


if __name__ == "__main__":
    table = main(sys.argv[1:])
    width = max(len(name) for name, _ in table)
    print(f"| {'measure':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for name, value in table:
        print(f"| {name:<{width}} | {value} |")
