"""The model's command line: --dry-run, costs, runs show's llm object, export finetune."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from tests.llm.fake_openai import FakeOpenAI

FLOW = """
name: cli-triage
steps:
  - id: tickets
    uses: file.fetch
    with: {path: items.jsonl}
    key: "{{ item.id }}"
  - id: classify
    uses: openai.transform
    with:
      instructions: Classify the ticket.
      input: "{{ item.text }}"
      output: {schema: {category: [billing, bug, other]}}
      max_output_tokens: 100
      store_prompts: true
"""


def write(workflow_dir: Path, count: int = 12) -> Path:
    items = [{"id": i, "text": f"billing issue {i}"} for i in range(count)]
    (workflow_dir / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    path = workflow_dir / "flow.yaml"
    path.write_text(textwrap.dedent(FLOW).lstrip())
    return path


def test_dry_run_counts_tokens_and_sends_nothing(fake_openai: FakeOpenAI, cli, workflow_dir) -> None:
    path = write(workflow_dir)
    result = cli("run", path, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    found = result.json()
    assert fake_openai.requests == []
    (step,) = found["steps"]
    assert step["items"] == 12 and step["max_output_tokens"] == 1200
    # the bound: every input token at $0.15/1M and every output token at $0.60/1M
    bound = (step["input_tokens"] * 0.15 + 1200 * 0.60) / 1e6
    assert abs(float(found["max_cost_usd"]) - bound) < 1e-9
    assert cli("runs", "--json").json() == []  # a dry run is not a run


def test_costs_runs_show_and_finetune_export(fake_openai: FakeOpenAI, cli, workflow_dir, tmp_path) -> None:
    path = write(workflow_dir)
    run = cli("run", path, "--json")
    assert run.exit_code == 0, run.stderr
    run_id = run.json()["id"]
    shown = cli("runs", "show", str(run_id), "--json").json()
    llm = next(s for s in shown["steps"] if s.get("llm"))["llm"]
    assert llm["calls"] == 12 and llm["input_tokens"] > 0 and llm["cost_usd"] > 0
    assert set(llm) >= {"calls", "input_tokens", "cached_input_tokens", "output_tokens", "cost_usd"}

    costs = cli("costs", "--since", "1d", "--by", "step", "--json").json()
    assert costs == [
        {
            "workflow": "cli-triage",
            "step": "classify",
            "calls": 12,
            "cache_hits": 0,
            "input_tokens": llm["input_tokens"],
            "cached_input_tokens": 0,
            "output_tokens": llm["output_tokens"],
            "cost_usd": costs[0]["cost_usd"],
            "unconfirmed_calls": 0,  # every call's answer was recorded
            "unconfirmed_usd": "0.000000000",
        }
    ]
    assert abs(float(costs[0]["cost_usd"]) - llm["cost_usd"]) < 1e-12
    assert cli("costs", "--since", "soon").exit_code == 1

    out = tmp_path / "train.jsonl"
    exported = cli("export", "finetune", "--workflow", "cli-triage", "--step", "classify", "-o", out)
    assert exported.exit_code == 0, exported.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 12
    roles = [m["role"] for m in lines[0]["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert json.loads(lines[0]["messages"][-1]["content"]) == {"category": "billing"}

    again = cli("run", path, "--dry-run", "--json").json()
    assert again["already_delivered"] == 12 and again["steps"][0]["items"] == 0
