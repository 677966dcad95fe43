"""An ops team writes routing (when:), digests (group:) and splits (key: on a transform) and
checks them in CI: each mistake is reported at its line and column, with what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

# validation: the history backend changes nothing here (the PostgreSQL pass leaves these out)
pytestmark = pytest.mark.no_history


def reported(result, path: Path) -> list[str]:
    """The problems ``automator validate`` printed for the file at ``path``."""
    return [line for line in result.stderr.splitlines() if line.startswith(f"{path}:")]


def validate_one_mistake(cli, path: Path) -> str:
    result = cli("validate", path)
    assert result.exit_code == 1, result.stdout
    problems = reported(result, path)
    assert len(problems) == 1, result.stderr
    return problems[0]


# --- valid files ---------------------------------------------------------------------------


def test_routing_digests_and_splits_validate(cli, write_workflow) -> None:
    path = write_workflow(
        """
        name: triage
        params: {min_urgency: 4}
        steps:
          - id: tickets
            uses: file.fetch
            with: {path: tickets.jsonl}
            key: "{{ item.id }}"
          - id: attachments
            uses: template.transform
            with: {mapping: {name: "{{ item.attachment }}"}}
            key: "{{ item.id }}/{{ item.attachment }}"
          - id: sure
            uses: schema.validate
            when: "{{ item.urgency is defined }}"
            with: {schema: {type: object}}
          - id: chat
            uses: webhook.deliver
            when: "{{ item.urgency >= params.min_urgency and steps.tickets }}"
            group: {size: 50, by: "{{ item.team }}"}
            with:
              url: https://chat.example.com/hook
              body:
                text: |
                  {{ item.count }} urgent tickets for {{ group or 'nobody' }}:
                  {% for ticket in items %}- {{ ticket.name }}
                  {% endfor %}
                count: "{{ items | length }}"
          - id: archive
            uses: file.deliver
            group: {}
            with: {path: "archive-{{ group }}.jsonl"}
          - id: everything
            uses: file.deliver
            with: {path: all.jsonl}
        """
    )

    result = cli("validate", path)

    assert result.exit_code == 0, result.stderr
    assert "1 workflow file(s) valid" in result.stdout


# --- when: -----------------------------------------------------------------------------------


def test_a_bare_when_is_told_to_be_a_template(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - {id: tickets, uses: file.fetch, with: {path: tickets.jsonl}, key: "{{ item.id }}"}
          - id: chat
            uses: file.deliver
            with: {path: urgent.jsonl}
            when: item.urgent
        """
    )

    line = validate_one_mistake(cli, path)

    assert line == f'{path}:6:11: when: must be a template such as "{{{{ item.urgent }}}}"'


def test_a_when_on_a_fetch_step_is_refused(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - id: tickets
            uses: file.fetch
            when: "{{ item.urgent }}"
            with: {path: tickets.jsonl}
          - {id: out, uses: file.deliver, with: {path: out.jsonl}}
        """
    )

    line = validate_one_mistake(cli, path)

    assert line == (
        f"{path}:4:5: when: is not allowed on fetch steps: a fetch step has no items yet; put it on a later step"
    )


def test_a_when_on_a_failure_notice_is_refused(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - {id: tickets, uses: file.fetch, with: {path: tickets.jsonl}, key: "{{ item.id }}"}
          - {id: out, uses: file.deliver, with: {path: out.jsonl}}
        on_failure:
          - id: page
            uses: file.deliver
            when: "{{ run.status == 'failed' }}"
            with: {path: failures.jsonl}
        """
    )

    line = validate_one_mistake(cli, path)

    assert line == (
        f"{path}:7:5: when: is not allowed in on_failure steps: they get one notice of the failed run, "
        "not the run's items"
    )


def test_a_syntax_error_in_a_multi_line_when_is_reported_at_its_line(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - {id: tickets, uses: file.fetch, with: {path: tickets.jsonl}, key: "{{ item.id }}"}
          - id: chat
            uses: file.deliver
            with: {path: urgent.jsonl}
            when: |
              {{ item.urgency >= 4
                 or item.vip
                 or item.team == }}
        """
    )

    line = validate_one_mistake(cli, path)

    # the template's third line is the file's ninth: where Jinja found the comparison cut short
    assert line == f"{path}:9:10: template syntax error: unexpected 'end of print statement'"


def test_a_when_with_an_unknown_filter(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - {id: tickets, uses: file.fetch, with: {path: tickets.jsonl}, key: "{{ item.id }}"}
          - id: chat
            uses: file.deliver
            with: {path: urgent.jsonl}
            when: "{{ item.subject | is_urgent }}"
        """
    )

    line = validate_one_mistake(cli, path)

    assert line == (f"{path}:6:11: unknown filter 'is_urgent' in template (is the plugin that provides it installed?)")


def test_a_when_that_reads_a_later_step(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - {id: tickets, uses: file.fetch, with: {path: tickets.jsonl}, key: "{{ item.id }}"}
          - id: chat
            uses: file.deliver
            with: {path: urgent.jsonl}
            when: "{{ steps.archive.items_out > 0 }}"
          - id: archive
            uses: file.deliver
            with: {path: all.jsonl}
        """
    )

    line = validate_one_mistake(cli, path)

    assert line == f"{path}:6:11: steps.archive refers to a later step; a template can read earlier steps only"


# --- group: ----------------------------------------------------------------------------------


def test_a_group_on_a_transform_is_refused(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - {id: tickets, uses: file.fetch, with: {path: tickets.jsonl}, key: "{{ item.id }}"}
          - id: shape
            uses: template.transform
            with: {template: "{{ item.subject }}"}
            group: {size: 10}
          - {id: out, uses: file.deliver, with: {path: out.jsonl}}
        """
    )

    line = validate_one_mistake(cli, path)

    assert line == (
        f"{path}:6:5: group: is only allowed on deliver steps (a digest: one delivery for many items); "
        "remove it from this transform step"
    )


def test_a_group_by_that_is_not_a_template(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - {id: tickets, uses: file.fetch, with: {path: tickets.jsonl}, key: "{{ item.id }}"}
          - id: digest
            uses: file.deliver
            with: {path: "digest-{{ group }}.jsonl"}
            group: {size: 50, by: team}
        """
    )

    line = validate_one_mistake(cli, path)

    assert line == f'{path}:6:27: group.by: must be a template such as "{{{{ item.team }}}}"'


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("0", "Input should be greater than or equal to 1"),
        ("10001", "Input should be less than or equal to 10000"),
    ],
)
def test_a_group_size_out_of_range(cli, write_workflow, size: str, message: str) -> None:
    path = write_workflow(
        """
        steps:
          - {id: tickets, uses: file.fetch, with: {path: tickets.jsonl}, key: "{{ item.id }}"}
          - id: digest
            uses: file.deliver
            with: {path: digest.jsonl}
            group: {size: SIZE}
        """.replace("SIZE", size)
    )

    line = validate_one_mistake(cli, path)

    assert line == f"{path}:6:19: steps.1.group.size: {message}"


def test_a_misspelt_key_inside_group_gets_a_suggestion(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - {id: tickets, uses: file.fetch, with: {path: tickets.jsonl}, key: "{{ item.id }}"}
          - id: digest
            uses: file.deliver
            with: {path: digest.jsonl}
            group:
              size: 50
              bye: "{{ item.team }}"
        """
    )

    line = validate_one_mistake(cli, path)

    assert line == f"{path}:8:7: unknown key 'bye'; did you mean 'by'?"


def test_items_in_a_step_without_group_is_an_unknown_name(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - {id: tickets, uses: file.fetch, with: {path: tickets.jsonl}, key: "{{ item.id }}"}
          - id: chat
            uses: webhook.deliver
            with:
              url: https://chat.example.com/hook
              body: {text: "{% for t in items %}{{ t.subject }} {% endfor %}"}
        """
    )

    line = validate_one_mistake(cli, path)

    assert line == f"{path}:7:20: unknown name 'items' in template; `items` is known only in a step with group:"


def test_group_in_a_group_steps_when_sees_one_item(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - {id: tickets, uses: file.fetch, with: {path: tickets.jsonl}, key: "{{ item.id }}"}
          - id: digest
            uses: file.deliver
            with: {path: "digest-{{ group }}.jsonl"}
            group: {by: "{{ item.team }}"}
            when: "{{ group == 'ops' }}"
        """
    )

    line = validate_one_mistake(cli, path)

    assert line == (
        f"{path}:7:11: unknown name 'group' in template; `group` is known only in the step's with: "
        "(when: sees one item)"
    )


# --- key: ------------------------------------------------------------------------------------


def test_a_key_on_a_transform_names_the_items_of_a_split(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - {id: tickets, uses: file.fetch, with: {path: tickets.jsonl}, key: "{{ item.id }}"}
          - id: attachments
            uses: template.transform
            with: {mapping: {name: "{{ item.name }}"}}
            key: "{{ item.message_id }}/{{ item.name }}"
          - {id: out, uses: file.deliver, with: {path: out.jsonl}}
        """
    )

    result = cli("validate", path)

    assert result.exit_code == 0, result.stderr


def test_a_key_on_a_deliver_step_is_refused(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - {id: tickets, uses: file.fetch, with: {path: tickets.jsonl}, key: "{{ item.id }}"}
          - id: out
            uses: file.deliver
            with: {path: out.jsonl}
            key: "{{ item.id }}"
        """
    )

    line = validate_one_mistake(cli, path)

    assert line == (
        f"{path}:6:5: key: is only allowed on fetch and transform steps (it names the items they make); "
        "remove it from this deliver step"
    )


def test_only_new_stays_on_fetch_steps(cli, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - {id: tickets, uses: file.fetch, with: {path: tickets.jsonl}, key: "{{ item.id }}"}
          - id: shape
            uses: template.transform
            with: {template: "{{ item }}"}
            key: "{{ item.id }}/1"
            only_new: true
          - {id: out, uses: file.deliver, with: {path: out.jsonl}}
        """
    )

    line = validate_one_mistake(cli, path)

    assert line == f"{path}:7:5: only_new: is only allowed on fetch steps; remove it from this transform step"


# --- the JSON Schema -------------------------------------------------------------------------


def test_the_schema_offers_when_group_and_key_with_their_descriptions(cli) -> None:
    result = cli("schema", "--builtin-only")

    assert result.exit_code == 0, result.stderr
    defs = result.json()["$defs"]
    step = defs["StepSpec"]["properties"]
    assert "{{ item.urgent }}" in step["when"]["description"]
    assert "Transform steps" in step["key"]["description"]
    assert {"$ref": "#/$defs/Group"} in step["group"]["anyOf"]
    assert "`items`" in step["group"]["description"]
    size = defs["Group"]["properties"]["size"]
    assert (size["minimum"], size["maximum"]) == (1, 10_000)
    assert "{{ item.team }}" in defs["Group"]["properties"]["by"]["description"]
