"""Fuzzing `automator validate` with malformed workflow files.

Hundreds of files made by mutating the shipped workflows (truncation, byte flips,
deleted or duplicated lines, wrong indentation, control characters, aliases, deep
nesting, huge scalars, wrong types, YAML tags) must each get an answer that is:
exit 0 or 1, no traceback, every problem as `FILE:LINE:COL: message`, within a
time bound and without the process growing by more than a bounded amount of memory.

Hypothesis is derandomized (a fixed seed derived from the test), so CI sees the same
files on every run; a failure prints the smallest file that shows it.
"""

from __future__ import annotations

import re
import resource
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO

# validation: the history backend changes nothing here (the PostgreSQL pass leaves these out)
pytestmark = pytest.mark.no_history

SHIPPED = [p.read_bytes() for p in sorted((REPO / "workflows").glob("*.yaml"))]
SECONDS_PER_FILE = 5.0
MEMORY_GROWTH_MB = 300  # for all the files together: a single alias bomb would take gigabytes

NASTY_VALUES = [
    b"!!float 'abc'",
    b"!!int 'x1'",
    b"!!timestamp garbage",
    b"2026-13-45",
    b"!!binary '!!!'",
    b"!!binary aGVsbG8=",
    b"!!python/object:os.system {}",
    b"!!python/name:os.system ''",
    b"!!set {a: null}",
    b"!!omap [1, 2]",
    b"!!str {a: 1}",
    b"!custom thing",
    b"*undefined",
    b"&anchor",
    b"[1, 2, {a: b}]",
    b"{a: [b, c]}",
    b"12345678901234567890123456789012345678901234567890",
    b"9" * 5000,
    b".inf",
    b".nan",
    b"-1",
    b"1.0e+400",
    b"~",
    b"yes",
    b"'unterminated",
    b'"\\ud800"',
    b'"\\x00"',
    b"{{ unclosed",
    b"'{{ item.x | nosuchfilter }}'",
    b"'{{ secrets }}'",
    b"'{{ " + b"(" * 3000 + b"1" + b")" * 3000 + b" }}'",
    b"'" + b"{% if 1 %}" * 1000 + b"{% endif %}" * 1000 + b"'",
    b"? [a, b]",
    b"<<: 5",
]

CONTROL = [bytes([c]) for c in (0, 1, 7, 8, 11, 12, 27, 127)] + ["\u0085".encode(), b"\xef\xbb\xbf", b"\xff", b"\xc3"]


def alias_bomb(levels: int) -> bytes:
    lines = [b'b0: &b0 ["x","x","x","x","x","x","x","x","x"]']
    for level in range(1, levels + 1):
        lines.append(b"b%d: &b%d [" % (level, level) + b", ".join([b"*b%d" % (level - 1)] * 9) + b"]")
    return b"\n".join(lines) + b"\n"


@st.composite
def mutation(draw: st.DrawFn, text: bytes) -> bytes:
    lines = text.split(b"\n")
    where = draw(st.integers(0, max(len(lines) - 1, 0)))
    kind = draw(
        st.sampled_from(
            [
                "truncate",
                "flip",
                "delete-line",
                "duplicate-line",
                "indent",
                "control",
                "value",
                "key",
                "bomb",
                "deep",
                "huge",
                "anchor",
            ]
        )
    )
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text)))]
    if kind == "flip":
        at = draw(st.integers(0, max(len(text) - 1, 0)))
        return text[:at] + bytes([draw(st.integers(0, 255))]) + text[at + 1 :]
    if kind == "delete-line":
        return b"\n".join(lines[:where] + lines[where + 1 :])
    if kind == "duplicate-line":
        return b"\n".join(lines[: where + 1] + lines[where:])
    if kind == "indent":
        line = lines[where]
        change = draw(st.sampled_from([b" ", b"   ", b"\t", b""]))
        lines[where] = change + line if change else line.lstrip()
        return b"\n".join(lines)
    if kind == "control":
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.sampled_from(CONTROL)) + text[at:]
    if kind == "value":
        # replace what follows a `key:` with a nasty value (a wrong type, a tag, garbage)
        line = lines[where]
        if b": " in line:
            lines[where] = line.split(b": ", 1)[0] + b": " + draw(st.sampled_from(NASTY_VALUES))
        else:
            lines[where] = line + b" " + draw(st.sampled_from(NASTY_VALUES))
        return b"\n".join(lines)
    if kind == "key":
        indent = lines[where][: len(lines[where]) - len(lines[where].lstrip())]
        key = draw(st.sampled_from([b"1", b"null", b"on", b"[a]", b"{a: 1}", b"? x", b"<<", b"steps", b"name"]))
        lines.insert(where, indent + key + b": " + draw(st.sampled_from(NASTY_VALUES)))
        return b"\n".join(lines)
    if kind == "bomb":
        levels = draw(st.integers(3, 12))
        return alias_bomb(levels) + text.replace(b"steps:", b"bomb: *b%d\nsteps:" % levels, 1)
    if kind == "deep":
        depth = draw(st.integers(30, 5000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b"{a: ", b"}"), (b"- ", b"")]))
        nested = opener * depth + b"x" + closer * depth
        lines.insert(where, b"params: " + nested)
        return b"\n".join(lines)
    if kind == "huge":
        size = draw(st.sampled_from([10_000, 200_000, 2_000_000]))
        lines.insert(where, b"description: '" + b"x" * size + b"'")
        return b"\n".join(lines)
    # an anchor and aliases to it in odd places
    lines.insert(where, b"x: &a {k: [1, 2, 3]}")
    lines.insert(min(where + 1, len(lines)), b"y: [*a, *a, *a, *a]")
    return b"\n".join(lines)


@st.composite
def malformed_file(draw: st.DrawFn) -> bytes:
    text = draw(st.sampled_from(SHIPPED))
    for _ in range(draw(st.integers(1, 3))):
        text = draw(mutation(text))
    return text


PROBLEM = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): \S")


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


@pytest.mark.timeout(120)  # the whole run; each file has its own bound below
def test_malformed_files_get_located_answers_fast(cli, workflow_dir: Path) -> None:
    path = workflow_dir / "fuzzed.yaml"
    (workflow_dir / "data").mkdir()
    rss_before = _max_rss_mb()
    seen: list[int] = []

    @settings(
        max_examples=400,
        derandomize=True,
        deadline=None,  # timed below, per file, with our own bound
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(content=malformed_file())
    def check(content: bytes) -> None:
        path.write_bytes(content)
        started = time.monotonic()
        result = cli("validate", path)
        elapsed = time.monotonic() - started
        output = result.stdout + result.stderr
        assert "Traceback" not in output, output
        assert result.exit_code in (0, 1), (result.exit_code, output)
        assert elapsed < SECONDS_PER_FILE, f"{elapsed:.1f}s"
        for line in result.stderr.splitlines():
            if line.startswith(("warning: ", "hint: ")) or re.match(r"^\d+ of \d+ file\(s\) invalid", line):
                continue
            match = PROBLEM.match(line)
            assert match is not None, f"not FILE:LINE:COL: message: {line!r}"
            assert match["file"] == str(path)
            assert int(match["line"]) >= 1 and int(match["col"]) >= 1
        if result.exit_code == 1:
            assert any(PROBLEM.match(line) for line in result.stderr.splitlines()), output
        seen.append(result.exit_code)

    check()
    assert len(seen) >= 300
    assert seen.count(1) > len(seen) // 2  # the mutations do break files
    assert _max_rss_mb() - rss_before < MEMORY_GROWTH_MB
