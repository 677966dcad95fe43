"""``automator export finetune``: chat fine-tuning JSONL from a step's delivered items."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from automator.cli.common import settings, stderr
from automator.errors import ConfigError
from automator.history.protocols import ModelCallStore
from automator.redaction import process_redactor

MIN_EXAMPLES = 10  # OpenAI refuses smaller training files


def finetune_examples(store: ModelCallStore, workflow: str, step_id: str) -> list[dict[str, Any]]:
    """One {"messages": [...]} per delivered item whose prompt and validated answer were kept."""
    seen: set[str] = set()
    examples = []
    for prompt, response in store.delivered_prompts(workflow, step_id):
        if not isinstance(prompt, list) or response is None:
            continue
        # runs stored these redacted; a history written by an older version may not be:
        # the file goes to a third party, so the secrets this process knows go again
        example = process_redactor().data({"messages": [*prompt, {"role": "assistant", "content": response}]})
        text = json.dumps(example, ensure_ascii=False, sort_keys=True)
        if text not in seen:
            seen.add(text)
            examples.append(example)
    return examples


@click.group("export")
def export() -> None:
    """Export data from the run history."""


@export.command("finetune")
@click.option("--workflow", required=True, help="The workflow whose model step to learn from.")
@click.option("--step", "step_id", required=True, help="The openai.transform step (with store_prompts: true).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here (default: stdout).")
@click.pass_context
def finetune(ctx: click.Context, workflow: str, step_id: str, output: Path | None) -> None:
    """Chat fine-tuning JSONL ({"messages": [system, user, assistant]}) from delivered items."""
    examples = finetune_examples(settings(ctx).history().model_calls, workflow, step_id)
    if not examples:
        raise ConfigError(
            f"no delivered items with kept prompts for {workflow} / {step_id}",
            hint="set store_prompts: true on the step and run it; only delivered items are exported",
        )
    text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        stderr.print(f"wrote {len(examples)} example(s) to {output}", markup=False)
    if len(examples) < MIN_EXAMPLES:
        stderr.print(
            f"warning: {len(examples)} example(s); fine-tuning needs at least {MIN_EXAMPLES} (50-100 to see gains)",
            markup=False,
        )
