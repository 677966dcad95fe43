"""Run every benchmark and print one table: ``python benchmarks/run.py [--only NAME]``.

Each benchmark module has ``main() -> list[tuple[str, str]]`` (metric, value). A module
that is missing or fails is reported in the table, never silently left out.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

BENCHMARKS = {
    "engine": "engine_bench",  # 10,000 items through four steps vs a plain loop
    "llm": "llm_throughput",  # 2,000 model calls against rate limits
    "daemon": "daemon_bench",  # 100 workflows firing every second
    "kill": "kill_bench",  # 100 runs SIGKILLed at random moments and restarted: what each crash cost
    "stream": "stream_bench",  # 1,000,000 items' peak memory; first delivery behind a 200 ms model step
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="Run only these.")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    table = Table(title="automator benchmarks")
    for column in ("benchmark", "metric", "value"):
        table.add_column(column)
    failed = False
    for name, module_name in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        try:
            rows = importlib.import_module(module_name).main()
        except Exception as exc:  # noqa: BLE001 - a broken benchmark is shown in the table
            traceback.print_exc()
            rows = [("error", f"{type(exc).__name__}: {exc}")]
            failed = True
        rows.append(("took", f"{time.perf_counter() - started:.1f}s"))
        for i, (metric, value) in enumerate(rows):
            table.add_row(name if i == 0 else "", metric, value)
        table.add_section()
    Console().print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
