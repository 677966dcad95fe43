"""An ops team checks workflow files in CI: every problem, at its line and column, at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO

# validation: the history backend changes nothing here (the PostgreSQL pass leaves these out)
pytestmark = pytest.mark.no_history

GOOD = """
name: good
steps:
  - id: read
    uses: file.fetch
    with: {path: data.jsonl}
  - id: write
    uses: file.deliver
    with: {path: out.jsonl}
"""


def problems(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if ":" in line and not line.startswith(("warning", "hint"))]


def test_a_valid_file_passes(cli, write_workflow) -> None:
    path = write_workflow(GOOD)
    result = cli("validate", path)
    assert result.exit_code == 0, result.stderr
    assert "1 workflow file(s) valid" in result.stdout


def test_every_sample_workflow_validates(cli) -> None:
    result = cli("validate", REPO / "workflows")
    assert result.exit_code == 0, result.stderr


def test_malformed_yaml_is_reported_at_its_place(cli, write_workflow) -> None:
    path = write_workflow("name: x\nsteps:\n  - id: a\n    uses: [file.fetch\n")
    result = cli("validate", path)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{path}:5:1: invalid YAML") or f"{path}:" in result.stderr
    line = problems(result)[0]
    assert "invalid YAML" in line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("# only a comment\n", "the file is empty"),
        ("- id: a\n- id: b\n", "must be a mapping of keys (name, steps, ...), not a list"),
        ("just text\n", "must be a mapping"),
    ],
)
def test_empty_files_and_top_level_lists(cli, write_workflow, text: str, message: str) -> None:
    path = write_workflow(text)
    result = cli("validate", path)
    assert result.exit_code == 1
    assert f"{path}:1:1: " in result.stderr
    assert message in result.stderr


def test_unknown_keys_get_a_suggestion(cli, write_workflow) -> None:
    path = write_workflow(
        """
        name: typo
        shedule:
          every: 5m
        steps:
          - id: read
            uses: file.fetch
            retires: 3
            with: {path: data.jsonl, formt: jsonl}
        """
    )
    result = cli("validate", path)
    assert result.exit_code == 1
    assert f"{path}:2:1: unknown key 'shedule'; did you mean 'schedule'?" in result.stderr
    assert f"{path}:7:5: unknown key 'retires'; did you mean 'retry'?" in result.stderr
    assert f"{path}:8:30: unknown key 'formt'; did you mean 'format'?" in result.stderr


def test_wrong_types_are_reported_at_the_value(cli, write_workflow) -> None:
    path = write_workflow(
        """
        max_active_runs: many
        steps:
          - id: read
            uses: file.fetch
            concurrency: -2
            with:
              path: data.jsonl
              missing_ok: perhaps
        """
    )
    result = cli("validate", path)
    assert result.exit_code == 1
    assert f"{path}:1:18: max_active_runs: Input should be a valid integer" in result.stderr
    assert f"{path}:5:18: steps.0.concurrency: Input should be greater than or equal to 1" in result.stderr
    assert f"{path}:8:19: missing_ok: Input should be a valid boolean" in result.stderr


def test_an_unknown_step_type_lists_the_installed_ones(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetsh
        """
    )
    result = cli("validate", path)
    assert result.exit_code == 1
    line = next(p for p in problems(result) if "unknown step type" in p)
    assert line.startswith(f"{path}:3:11: unknown step type 'file.fetsh'; did you mean 'file.fetch'?")
    for name in (
        "http.fetch",
        "file.fetch",
        "template.transform",
        "schema.validate",
        "file.deliver",
        "webhook.deliver",
    ):
        assert name in line


def test_an_error_inside_a_step_config_is_reported_at_that_key(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - id: read
            uses: http.fetch
            with:
              url: https://example.com/items
              method: DELETE
              timeout: soon
          - id: check
            uses: schema.validate
            with:
              schema: {type: thing}
        """
    )
    result = cli("validate", path)
    assert result.exit_code == 1
    assert f"{path}:6:15: method: Input should be 'GET', 'POST', 'PUT' or 'PATCH'" in result.stderr
    assert f"{path}:7:16: timeout: invalid duration 'soon'" in result.stderr
    assert f"{path}:11:15: schema: not a valid JSON Schema" in result.stderr


def test_a_missing_required_setting(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - id: read
            uses: http.fetch
            with: {}
          - uses: file.deliver
            with: {path: out.jsonl}
        """
    )
    result = cli("validate", path)
    assert f"{path}:4:11: missing required key 'url'" in result.stderr
    assert f"{path}:5:5: missing required key 'id'" in result.stderr


@pytest.mark.parametrize(
    ("schedule", "line_col", "message"),
    [
        ('cron: "61 * * * *"', "2:9", "invalid cron '61 * * * *'"),
        ('cron: "* * *"', "2:9", "expected 5 fields"),
        ('cron: "0 9 * * 8"', "2:9", "invalid day of week '8'"),
        ("every: 5 minutes", "2:10", "invalid duration '5 minutes'"),
        ("every: 15m\n  timezone: Mars/Olympus", "3:13", "unknown time zone 'Mars/Olympus'"),
        ("every: 15m\n  cron: '* * * * *'", "3:3", "exactly one of cron, every or at (found cron, every)"),
    ],
)
def test_bad_schedules(cli, write_workflow, schedule: str, line_col: str, message: str) -> None:
    path = write_workflow(
        f"schedule:\n  {schedule}\nsteps:\n  - id: read\n    uses: file.fetch\n    with: {{path: x.json}}\n"
    )
    result = cli("validate", path)
    assert result.exit_code == 1
    assert f"{path}:{line_col}: " in result.stderr, result.stderr
    assert message in result.stderr


def test_template_problems_are_found_before_running(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: data.jsonl}
            key: "{{ item.id }"
          - id: shape
            uses: template.transform
            with:
              mapping:
                title: "{{ item.title | upper }}"
                when: "{{ run.started_at }}"
                later: "{{ steps.write.id }}"
                nowhere: "{{ steps.nope.id }}"
                limit: "{{ params.limit }}"
                odd: "{{ itme.id }}"
                filtered: "{{ item.title | shout }}"
          - id: write
            uses: file.deliver
            with: {path: out.jsonl}
        """
    )
    result = cli("validate", path)
    assert result.exit_code == 1
    err = result.stderr
    assert f"{path}:5:10: template syntax error" in err
    assert f"{path}:12:16: steps.write refers to a later step" in err
    assert f"{path}:13:18: steps.nope refers to no step" in err
    assert f"{path}:14:16: params.limit is not declared" in err
    assert f"{path}:15:14: unknown name 'itme' in template" in err
    assert f"{path}:16:19: unknown filter 'shout' in template" in err
    assert "flow.yaml:10:" not in err and "flow.yaml:11:" not in err  # the good templates pass


def test_a_syntax_error_in_a_block_template_points_at_its_line(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: data.jsonl}
          - id: shape
            uses: template.transform
            with:
              template: |
                Title: {{ item.title }}
                Body: {{ item.body
        """
    )
    result = cli("validate", path)
    assert f"{path}:10:" in result.stderr and "template syntax error" in result.stderr


def test_duplicate_step_ids_and_structure(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - id: shape
            uses: template.transform
            with: {template: "{{ item }}"}
          - id: shape
            uses: file.fetch
            with: {path: x.jsonl}
            key: "{{ item.id }}"
        """
    )
    result = cli("validate", path)
    err = result.stderr
    assert f"{path}:3:11: the first step must be a fetch step" in err
    assert f"{path}:5:9: duplicate step id 'shape'" in err
    assert f"{path}:6:11: fetch steps must come before all other steps" in err


def test_all_problems_of_all_files_at_once_as_json(cli, write_workflow, workflow_dir: Path) -> None:
    write_workflow(GOOD, "good.yaml")
    bad = write_workflow("steps:\n  - id: a\n    uses: nope\n  - id: 1b\n    uses: file.deliver\n", "bad.yml")
    result = cli("validate", workflow_dir, "--json")
    assert result.exit_code == 1
    found = result.json()
    assert all(set(p) == {"file", "line", "column", "message"} for p in found)
    assert [(p["file"], p["line"], p["column"]) for p in found] == [
        (str(bad), 3, 11),
        (str(bad), 4, 5),
        (str(bad), 4, 9),
    ]
    assert "unknown step type 'nope'" in found[0]["message"]
    assert "missing required key 'with.path'" in found[1]["message"]
    assert "invalid step id '1b': start with a letter" in found[2]["message"]


def test_a_missing_file_is_a_problem_not_a_crash(cli, tmp_path: Path) -> None:
    result = cli("validate", tmp_path / "nope.yaml")
    assert result.exit_code == 1
    assert "nope.yaml:1:1: " in result.stderr


def test_duplicate_keys_and_workflow_names(cli, write_workflow, workflow_dir: Path) -> None:
    write_workflow(GOOD, "one.yaml")
    write_workflow(GOOD, "two.yaml")
    three = write_workflow(GOOD.replace("name: good", "name: other\nname: again"), "three.yaml")
    result = cli("validate", workflow_dir)
    assert f"{three}:2:1: duplicate key 'name'" in result.stderr
    assert "two.yaml:1:1: workflow name 'good' is already used" in result.stderr


def test_max_output_style_limits_live_in_step_configs(cli, write_workflow) -> None:
    # a step type's pydantic constraints are checked at load time too
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: data.csv, delimiter: ";;"}
        """
    )
    result = cli("validate", path)
    assert f"{path}:4:39: delimiter: String should have at most 1 character" in result.stderr


def test_schema_describes_every_installed_step_type(cli) -> None:
    result = cli("schema")
    assert result.exit_code == 0
    schema = result.json()
    step = schema["$defs"]["StepSpec"]
    assert "file.fetch" in step["properties"]["uses"]["enum"]
    branches = {b["if"]["properties"]["uses"]["const"]: b["then"] for b in step["allOf"]}
    http = schema["$defs"]["config.http.fetch"]
    assert branches["http.fetch"]["properties"]["with"]["$ref"] == "#/$defs/config.http.fetch"
    assert http["properties"]["url"]["description"].startswith("The address to fetch")
    assert http["additionalProperties"] is False


def _outline(schema: dict) -> dict:
    """What an editor needs from the schema, leaving out how a pydantic version renders types."""
    defs = schema["$defs"]
    return {
        "top": sorted(schema["properties"]),
        "step": sorted(defs["StepSpec"]["properties"]),
        "uses": defs["StepSpec"]["properties"]["uses"]["enum"],
        "configs": {name: sorted(d.get("properties", {})) for name, d in defs.items() if name.startswith("config.")},
    }


def test_the_committed_schema_file_is_current(cli) -> None:
    import json

    committed = json.loads((REPO / "workflow.schema.json").read_text(encoding="utf-8"))
    result = cli("schema", "--builtin-only")
    assert _outline(committed) == _outline(result.json()), (
        "run: automator schema --builtin-only -o workflow.schema.json"
    )
