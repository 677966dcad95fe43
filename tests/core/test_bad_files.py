"""Bad input can't hurt: every broken or hostile workflow file is a located problem, fast.

`automator validate` answers each of these with `FILE:LINE:COL: message` and exit 1 —
never a traceback, never a hang, never gigabytes of memory.
"""

from __future__ import annotations

import json
import re
import time
import tracemalloc
from pathlib import Path

import pytest

from tests.core.test_validate import problems

# validation: the history backend changes nothing here (the PostgreSQL pass leaves these out)
pytestmark = pytest.mark.no_history

STEPS = "steps:\n  - id: read\n    uses: file.fetch\n    with: {path: data.jsonl}\n"


def alias_bomb(levels: int) -> bytes:
    """A "billion laughs" file: about 1 KB, 9**levels values once its aliases are expanded."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return ("\n".join(lines) + f"\nparams: {{x: *a{levels}}}\n" + STEPS).encode()


def merge_bomb(levels: int) -> bytes:
    """The same through merge keys (<<): each level merges the one before twice."""
    lines = ["m0: &m0 {k: 1}"]
    for level in range(1, levels + 1):
        lines.append(f"m{level}: &m{level} {{<<: [*m{level - 1}, *m{level - 1}], k{level}: 1}}")
    return ("\n".join(lines) + f"\nparams: *m{levels}\n" + STEPS).encode()


# (file content, where the problem is "LINE:COL", what the message says)
CASES: dict[str, tuple[bytes, str, str]] = {
    "deep-flow-nesting": (b"steps: " + b"[" * 5000 + b"]" * 5000 + b"\n", "1:71", "nested more than 64 levels"),
    "deep-block-nesting": (
        b"params:\n" + b"".join(b"  " * (i + 1) + b"k%d:\n" % i for i in range(200)),
        "65:129",
        "nested more than 64 levels",
    ),
    "nul-byte": (b"name: a\x00b\n" + STEPS.encode(), "1:8", "a NUL byte"),
    "control-character": (b"name: x\ndescription: bell\x07\n" + STEPS.encode(), "2:18", "control character U+0007"),
    "float-tag-on-text": (b"timeout: !!float 'abc'\n" + STEPS.encode(), "1:10", "'abc' is not a valid float"),
    "impossible-date": (b"schedule: {at: 2026-13-45}\n" + STEPS.encode(), "1:16", "'2026-13-45' is not a valid"),
    "timestamp-tag-garbage": (b"description: !!timestamp garbage\n" + STEPS.encode(), "1:14", "not a valid timestamp"),
    "int-of-5000-digits": (b"max_active_runs: " + b"9" * 5000 + b"\n" + STEPS.encode(), "1:18", "not a valid int"),
    "python-object-tag": (b"params: !!python/object:os.system {}\n" + STEPS.encode(), "1:9", "!!python/object"),
    "python-name-tag": (b"description: !!python/name:os.system ''\n" + STEPS.encode(), "1:14", "python/name"),
    "binary-tag": (b"params: {x: !!binary aGVsbG8=}\n" + STEPS.encode(), "1:13", "!!binary is not supported"),
    "set-tag": (b"params: !!set {a: null}\n" + STEPS.encode(), "1:9", "!!set is not supported"),
    "alias-bomb-9": (alias_bomb(9), "", "expanding the aliases"),
    "alias-bomb-12": (alias_bomb(12), "", "expanding the aliases"),
    "merge-bomb-40": (merge_bomb(40), "", "expanding the aliases"),
    "a-list-as-a-key": (b"? [a, b]\n: 1\n" + STEPS.encode(), "1:3", "a key must be a plain name"),
    "undefined-alias": (b"params: *nothing\n" + STEPS.encode(), "1:9", "undefined alias"),
    "two-documents": (STEPS.encode() + b"---\n" + STEPS.encode(), "5:1", "another document"),
    "not-utf8": ("name: caf\u00e9\n".encode("latin-1") + STEPS.encode(), "1:10", "not UTF-8 text (byte 0xe9 here)"),
    "endless-duration": (b"timeout: 99999999999999w\n" + STEPS.encode(), "1:10", "too long"),
    "infinite-duration": (b"timeout: .inf\n" + STEPS.encode(), "1:10", "too long"),
    "nan-duration": (b"timeout: .nan\n" + STEPS.encode(), "1:10", "expected a duration"),
    "huge-file": (b"description: '" + b"x" * (1024 * 1024) + b"'\n" + STEPS.encode(), "1:1", "larger than 1024 KB"),
    "deep-template": (
        b'steps:\n  - id: read\n    uses: file.fetch\n    with: {path: "{{ '
        + b"(" * 3000
        + b"1"
        + b")" * 3000
        + b' }}"}\n',
        "4:18",
        "the template is nested too deeply",
    ),
    "deep-template-blocks": (
        b'steps:\n  - id: read\n    uses: file.fetch\n    with: {path: "'
        + b"{% if 1 %}" * 2000
        + b"x"
        + b"{% endif %}" * 2000
        + b'"}\n',
        "4:18",
        "the template is nested too deeply",
    ),
    "at-year-9999": (
        b"schedule: {at: 9999-12-31T23:00:00, timezone: America/New_York}\n" + STEPS.encode(),
        "1:16",
        "is out of range: use a year from 1970 to 9998",
    ),
    "duplicate-keys": (b"name: a\nname: b\n" + STEPS.encode(), "2:1", "duplicate key 'name'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_file_is_a_located_problem(cli, workflow_dir: Path, case: str) -> None:
    content, where, message = CASES[case]
    path = workflow_dir / f"{case}.yaml"
    path.write_bytes(content)
    tracemalloc.start()
    started = time.monotonic()
    try:
        result = cli("validate", path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 5, "refused at once"
    assert peak < 200 * 1024 * 1024, f"{peak / 1e6:.0f} MB"
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = problems(result)
    assert lines, result.stderr
    assert all(re.match(rf"{re.escape(str(path))}:\d+:\d+: \S", line) for line in lines), lines
    located = [line for line in lines if message in line]
    assert located, f"{message!r} not in {lines}"
    if where:
        assert located[0].startswith(f"{path}:{where}: "), located[0]


def test_a_long_value_is_quoted_short_in_the_message(cli, write_workflow) -> None:
    path = write_workflow("timeout: " + "x" * 100_000 + "\n" + STEPS)
    result = cli("validate", path)
    assert result.exit_code == 1
    [line] = problems(result)
    assert line.startswith(f"{path}:1:10: timeout: invalid duration 'xxx")
    assert len(line) < len(str(path)) + 400


def test_yaml_1_1_booleans_and_numbers_as_keys_stay_as_written(cli, write_workflow) -> None:
    path = write_workflow("params: {on: 1, yes: 2, 1: 3, null: 4}\n" + STEPS)
    result = cli("validate", path)
    # `on:` is not True: params keys are names, and 1 or null are not valid ones
    assert result.exit_code == 1
    [line] = problems(result)
    assert "invalid parameter name '1'" in line
    assert "True" not in result.stderr


def test_a_directory_or_a_missing_file(cli, workflow_dir: Path) -> None:
    folder = workflow_dir / "sub.yaml"
    folder.mkdir()
    result = cli("run", folder)
    assert result.exit_code != 0
    assert "Traceback" not in result.stderr
    result = cli("validate", workflow_dir / "missing.yaml")
    assert result.exit_code == 1
    assert f"{workflow_dir / 'missing.yaml'}:1:1: no such file or folder" in result.stderr


def test_a_byte_order_mark_is_fine(cli, workflow_dir: Path) -> None:
    path = workflow_dir / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + STEPS.encode())
    result = cli("validate", path)
    assert result.exit_code == 0, result.stderr


# --- plugin authors: where a config error of their step type is shown ---------------------

PLUGIN = """
from pydantic import model_validator
from pydantic_core import PydanticCustomError

from automator import DeliverStep, StepConfig, hookimpl


class SmtpConfig(StepConfig):
    host: str = "localhost"
    port: int = 25
    starttls: bool = False
    username: str | None = None
    password: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "SmtpConfig":
        if self.port == 465 and self.starttls:
            raise ValueError("port 465 speaks TLS from the start: starttls must be off")
        if self.password is not None and self.username is None:
            raise PydanticCustomError("needs_user", "a password needs a user name", {"field": "password"})
        if self.host == "nowhere":
            raise ValueError("the server refuses us")
        return self


class SmtpDeliver(DeliverStep[SmtpConfig]):
    name = "smtp.deliver"

    def deliver(self, item):
        pass


@hookimpl
def register_step_types(register):
    register(SmtpDeliver)
"""


@pytest.mark.parametrize(
    ("config", "where", "message"),
    [
        # the message names a key: shown at that key
        ("{host: mail, starttls: true, port: 465}", "7:40", "port: port 465 speaks TLS"),
        # PydanticCustomError with {"field": ...}: at that key
        ("\n      host: mail\n      password: secret", "9:7", "password: a password needs a user name"),
        # no key named: at `with:` itself, not at its first entry
        ("\n      host: nowhere", "7:5", "with: the server refuses us"),
    ],
)
def test_a_model_validator_error_is_shown_at_the_key_it_names(
    cli, write_workflow, workflow_dir: Path, config: str, where: str, message: str
) -> None:
    plugins = workflow_dir.parent / "plugins"
    plugins.mkdir()
    (plugins / "smtp.py").write_text(PLUGIN, encoding="utf-8")
    path = write_workflow(
        f"""
steps:
  - id: read
    uses: file.fetch
    with: {{path: data.jsonl}}
  - id: mail
    uses: smtp.deliver
    with: {config}
"""
    )
    result = cli("validate", path)
    assert result.exit_code == 1
    assert f"{path}:{where}: {message}" in result.stderr, result.stderr


def test_a_plugin_validator_that_crashes_is_a_located_problem(cli, write_workflow, workflow_dir: Path) -> None:
    plugins = workflow_dir.parent / "plugins"
    plugins.mkdir()
    (plugins / "buggy.py").write_text(
        PLUGIN.replace('raise ValueError("the server refuses us")', "raise KeyError(self.host)"),
        encoding="utf-8",
    )
    path = write_workflow(STEPS + "  - id: mail\n    uses: smtp.deliver\n    with: {host: nowhere}\n")
    result = cli("validate", path)
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert f"{path}:7:5: the config check of step type 'smtp.deliver' failed: KeyError: 'nowhere'" in result.stderr


@pytest.mark.parametrize(
    ("given", "expected"),
    [("2026-13-45", "2026-13-45"), ("!!float abc", "!!float abc"), ("[" * 3000, "[" * 3000), ("[1, 2]", [1, 2])],
)
def test_a_param_value_yaml_cannot_read_stays_text(cli, write_workflow, given: str, expected: object) -> None:
    path = write_workflow(
        """
        params: {x: ""}
        steps:
          - id: read
            uses: file.fetch
            with: {path: data.jsonl}
          - id: shape
            uses: template.transform
            with: {mapping: {x: "{{ params.x }}"}}
          - id: write
            uses: file.deliver
            with: {path: out.jsonl}
        """
    )
    (path.parent / "data.jsonl").write_text('{"id": 1}\n', encoding="utf-8")
    result = cli("run", path, "--param", f"x={given}", "--json")
    assert "Traceback" not in result.stderr
    assert result.json()["status"] == "succeeded", result.stderr
    assert json.loads((path.parent / "out.jsonl").read_text(encoding="utf-8")) == {"x": expected}
