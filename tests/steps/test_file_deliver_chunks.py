"""file.deliver under the streaming engine: one deliver_batch per chunk, close() at the end.

The engine hands a deliver step one chunk at a time, several at once and in any order; a
chunk's items count as delivered when deliver_batch returns; a resumed run (the same run
id, perhaps a new process) delivers the chunks whose delivery was not recorded and closes.
The step is driven here through automator.testing's StepUnderTest, as the engine drives
it; the end-to-end tests run `automator run` and hold with any chunk size.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from automator.errors import StepError
from automator.testing import CliResult, WorkflowRunner


def workflow(settings: str) -> str:
    return textwrap.dedent(
        f"""
        steps:
          - {{id: src, uses: test.fetch}}
          - id: save
            uses: file.deliver
            with: {settings}
        """
    )


def records(count: int, *, first: int = 0) -> list[dict[str, Any]]:
    return [{"n": n, "text": f"item {n}"} for n in range(first, first + count)]


def jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def parts_folders(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if ".automator-run-" in p.name]


def test_chunks_delivered_out_of_order_land_in_item_order(automator_runner: WorkflowRunner) -> None:
    save = automator_runner.step(workflow("{path: out/items.jsonl}"), "save", run_id=3)
    chunks = save.chunks(records(1000), size=100)

    save.deliver_chunks(chunks[::-1], concurrency=4)  # the last chunk first, four at once
    # delivered, not yet assembled: the target appears when the run ends
    assert not (automator_runner.directory / "out" / "items.jsonl").exists()
    save.close()

    out = automator_runner.directory / "out"
    assert [r["n"] for r in jsonl(out / "items.jsonl")] == list(range(1000))
    assert parts_folders(out) == []
    assert save.summary() == f"wrote 1000 items to {out / 'items.jsonl'}"


def test_a_chunk_delivered_twice_is_in_the_file_once(automator_runner: WorkflowRunner) -> None:
    save = automator_runner.step(workflow("{path: items.jsonl}"), "save", run_id=3)
    chunks = save.chunks(records(300), size=100)

    save.deliver_chunks([chunks[0], chunks[1], chunks[1], chunks[2], chunks[0]])
    save.close()

    assert [r["n"] for r in jsonl(automator_runner.directory / "items.jsonl")] == list(range(300))


@pytest.mark.parametrize("mode", ["overwrite", "append"])
def test_after_a_crash_the_resumed_run_writes_every_item_once(automator_runner: WorkflowRunner, mode: str) -> None:
    target = automator_runner.write("items.jsonl", '{"n": "before"}\n')
    flow = workflow(f"{{path: items.jsonl, mode: {mode}}}")
    crashed = automator_runner.step(flow, "save", run_id=7)
    chunks = crashed.chunks(records(500), size=100)
    crashed.deliver_chunks(chunks[:3])  # then the process dies: no close(); chunk 2 was not recorded

    other_run = automator_runner.step(flow, "save", run_id=8)  # a later run's parts are its own
    other_run.deliver_chunks(other_run.chunks(records(1, first=900)))

    resumed = automator_runner.step(flow, "save", run_id=7)
    resumed.deliver_chunks(chunks[2:])
    resumed.close()

    before = [{"n": "before"}] if mode == "append" else []
    assert jsonl(target) == before + records(500)
    assert resumed.summary() == f"wrote 500 items to {target}"
    assert [p.name for p in parts_folders(automator_runner.directory)] == [".items.jsonl.automator-run-8-save"]


def test_a_chunk_formed_again_with_fewer_items_replaces_the_one_written_before_the_crash(
    automator_runner: WorkflowRunner,
) -> None:
    # before the crash: items 100..199 delivered as one chunk, not recorded; on resume item
    # 100 ends otherwise (skipped, say) and the chunk is 101..199
    flow = workflow("{path: items.jsonl}")
    crashed = automator_runner.step(flow, "save", run_id=7)
    crashed.deliver_chunks(crashed.chunks(records(200), size=100))

    resumed = automator_runner.step(flow, "save", run_id=7)
    resumed.deliver_chunks([resumed.items(records(99, first=101), first_seq=101)])
    resumed.close()

    assert [r["n"] for r in jsonl(automator_runner.directory / "items.jsonl")] == [*range(100), *range(101, 200)]


# A crash inside close(): the child process assembles and is killed (SIGKILL, from an audit
# hook) at one moment of it; a resumed run's close() then finishes the file.
CRASHING_CLOSE = """
import os, signal, sys
from pathlib import Path
from automator.testing import WorkflowRunner

directory, history_url, flow, event, needle = sys.argv[1:]
runner = WorkflowRunner(Path(directory), history_url)
save = runner.step(flow, "save", run_id=7)
save.deliver_chunks(save.chunks([{"n": n, "text": f"item {n}"} for n in range(250)], size=100))

def crash(name, args):
    # os.rename's arguments: source, destination, ...; os.rmdir's: the folder, ...
    if name != event:
        return
    path = args[1] if name == "os.rename" else args[0]
    if os.path.basename(str(path)).startswith(needle):
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(crash)
save.close()
"""

MOMENTS = {
    "before the commit": ("os.rename", "assembled-"),  # the assembled file is complete, not committed
    "before the target changes": ("os.rename", "items."),  # committed, parts deleted
    "before the folder is removed": ("os.rmdir", ".items."),  # the target is written
}


@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize(
    ("mode", "name"), [("append", "items.jsonl"), ("append", "items.json"), ("overwrite", "items.csv")]
)
def test_a_crash_while_closing_never_writes_an_item_twice(
    automator_runner: WorkflowRunner, automator_history_url: str, moment: str, mode: str, name: str
) -> None:
    old = {"items.jsonl": '{"n": -1, "text": "old"}\n', "items.json": '[{"n": -1, "text": "old"}]\n'}
    target = automator_runner.write(name, old.get(name, "n,text\n-1,old\n"))
    flow = workflow(f"{{path: {name}, mode: {mode}}}")
    event, needle = MOMENTS[moment]
    arguments = [str(automator_runner.directory), automator_history_url, flow, event, needle]
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_CLOSE, *arguments],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr

    resumed = automator_runner.step(flow, "save", run_id=7)
    resumed.close()

    expected = [{"n": n, "text": f"item {n}"} for n in range(250)]
    if name == "items.jsonl":
        assert jsonl(target) == [{"n": -1, "text": "old"}, *expected]
    elif name == "items.json":
        assert json.loads(target.read_text()) == [{"n": -1, "text": "old"}, *expected]
    else:  # overwrite: the old rows go, the header is written once
        assert list(csv.DictReader(io.StringIO(target.read_text()))) == [
            {"n": str(r["n"]), "text": r["text"]} for r in expected
        ]
    assert parts_folders(automator_runner.directory) == []


def test_append_adds_after_the_file_and_starts_a_new_line(automator_runner: WorkflowRunner) -> None:
    target = automator_runner.write("log.jsonl", '{"n": "a"}\n{"n": "b"}')  # no newline at the end
    save = automator_runner.step(workflow("{path: log.jsonl, mode: append}"), "save")
    save.deliver_chunks(save.chunks(records(150), size=50)[::-1])
    save.close()

    assert jsonl(target) == [{"n": "a"}, {"n": "b"}, *records(150)]


def test_csv_has_one_header_and_every_column_seen_across_the_chunks(automator_runner: WorkflowRunner) -> None:
    # the second chunk brings a key the first did not have: its column joins the header
    rows = [{"id": 1, "a": "x"}, {"id": 2, "a": "y"}, {"id": 3, "b": [1, 2]}, {"b": "z", "id": 4}]
    save = automator_runner.step(workflow("{path: out.csv}"), "save")
    save.deliver_chunks(save.chunks(rows, size=2)[::-1])
    save.close()

    assert (automator_runner.directory / "out.csv").read_text() == 'id,a,b\n1,x,\n2,y,\n3,,"[1, 2]"\n4,,z\n'


def test_csv_append_writes_the_header_only_for_a_new_file(automator_runner: WorkflowRunner) -> None:
    flow = workflow("{path: log.csv, mode: append, fields: [id, a]}")
    for run_id, first in ((1, 1), (2, 3)):
        save = automator_runner.step(flow, "save", run_id=run_id)
        save.deliver_chunks(save.chunks([{"id": first, "a": "x"}, {"id": first + 1, "a": "y"}], size=1)[::-1])
        save.close()

    assert (automator_runner.directory / "log.csv").read_text() == "id,a\n1,x\n2,y\n3,x\n4,y\n"


@pytest.mark.parametrize("existing", [None, "", "[]\n", '[\n  {"n": "old"}\n]\n'])
def test_json_is_one_valid_list_over_all_chunks(automator_runner: WorkflowRunner, existing: str | None) -> None:
    if existing is not None:
        automator_runner.write("list.json", existing)
    save = automator_runner.step(workflow("{path: list.json, mode: append}"), "save")
    save.deliver_chunks(save.chunks(records(25), size=10)[::-1])
    save.close()

    text = (automator_runner.directory / "list.json").read_text()
    old = [{"n": "old"}] if existing and "old" in existing else []
    assert json.loads(text) == old + records(25)
    if not old:  # laid out as json.dumps(indent=2) lays out the whole list
        assert text == json.dumps(records(25), indent=2) + "\n"


def test_json_append_to_a_file_that_is_not_a_list_fails_the_items(automator_runner: WorkflowRunner) -> None:
    target = automator_runner.write("list.json", '{"not": "a list"}\n')
    save = automator_runner.step(workflow("{path: list.json, mode: append}"), "save")

    with pytest.raises(StepError, match="not a JSON list"):
        save.deliver_chunks(save.chunks(records(3)))
    save.close()

    assert target.read_text() == '{"not": "a list"}\n'
    assert parts_folders(automator_runner.directory) == []


def test_when_the_file_cannot_be_written_the_parts_wait_for_the_resumed_run(automator_runner: WorkflowRunner) -> None:
    flow = workflow("{path: out/items.jsonl}")
    save = automator_runner.step(flow, "save", run_id=5)
    save.deliver_chunks(save.chunks(records(30), size=10))
    blocker = automator_runner.directory / "out" / "items.jsonl"
    blocker.mkdir()  # a folder where the file goes: the move onto it fails

    with pytest.raises(StepError, match="cannot write"):
        save.close()
    blocker.rmdir()
    resumed = automator_runner.step(flow, "save", run_id=5)
    resumed.close()

    assert jsonl(blocker) == records(30)
    assert resumed.summary() == f"wrote 30 items to {blocker}"


def test_a_run_that_delivered_nothing_leaves_the_file_alone(automator_runner: WorkflowRunner) -> None:
    target = automator_runner.write("items.jsonl", "kept\n")
    save = automator_runner.step(workflow("{path: items.jsonl}"), "save")
    save.deliver_chunks([])
    save.close()
    unborn = automator_runner.step(workflow("{path: new.jsonl}"), "save")
    unborn.close()

    assert target.read_text() == "kept\n"
    assert not (automator_runner.directory / "new.jsonl").exists()
    assert save.summary() is None
    assert parts_folders(automator_runner.directory) == []


def test_parts_keep_no_secret(automator_runner: WorkflowRunner) -> None:
    flow = workflow("{path: 'out-{{ secrets.TOKEN | length }}.jsonl'}")  # the path reads the secret
    save = automator_runner.step(flow, "save", secrets={"TOKEN": "s3cr3t-value"})
    save.deliver_chunks(save.chunks([{"note": "token is s3cr3t-value"}] * 3, size=2))
    folder = next(iter(parts_folders(automator_runner.directory)))
    assert all("s3cr3t" not in part.read_text() for part in folder.iterdir())
    save.close()

    assert jsonl(automator_runner.directory / "out-12.jsonl") == [{"note": "token is ***"}] * 3


# --- end to end: `automator run` -------------------------------------------------------------


def run(automator_cli: Any, directory: Path, settings: str, *, items: int, **env: str) -> CliResult:
    directory.mkdir(exist_ok=True)
    (directory / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(items)))
    flow = directory / "flow.yaml"
    flow.write_text(
        textwrap.dedent(
            f"""
            steps:
              - {{id: src, uses: file.fetch, with: {{path: in.jsonl}}}}
              - id: shape
                uses: template.transform
                with: {{mapping: {{n: "{{{{ item.n }}}}", text: "{{{{ item.text }}}} {{{{ secrets.TOKEN }}}}"}}}}
              - id: save
                uses: file.deliver
                with: {settings}
            """
        )
    )
    return automator_cli("run", flow, env={"AUTOMATOR_SECRET_TOKEN": "tok-123456", **env})


def shaped(count: int) -> list[dict[str, Any]]:
    return [{"n": n, "text": f"item {n} ***"} for n in range(count)]


def test_automator_run_writes_every_item_once_in_order(automator_cli: Any, tmp_path: Path) -> None:
    result = run(automator_cli, tmp_path / "wf", "{path: out/items.jsonl}", items=1050)

    assert result.exit_code == 0, result.stderr
    out = tmp_path / "wf" / "out"
    assert jsonl(out / "items.jsonl") == shaped(1050)
    assert f"wrote 1050 items to {out / 'items.jsonl'}" in result.stdout + result.stderr
    assert parts_folders(out) == []


def test_automator_run_appends_csv_with_one_header(automator_cli: Any, tmp_path: Path) -> None:
    first = run(automator_cli, tmp_path / "wf", "{path: log.csv, mode: append}", items=250)
    second = run(automator_cli, tmp_path / "wf", "{path: log.csv, mode: append}", items=120)

    assert (first.exit_code, second.exit_code) == (0, 0), first.stderr + second.stderr
    text = (tmp_path / "wf" / "log.csv").read_text()
    assert text.count("n,text") == 1
    assert list(csv.DictReader(io.StringIO(text))) == [
        {"n": str(r["n"]), "text": r["text"]} for r in shaped(250) + shaped(120)
    ]


def test_automator_run_writes_one_json_list(automator_cli: Any, tmp_path: Path) -> None:
    result = run(automator_cli, tmp_path / "wf", "{path: out.json}", items=333)

    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "wf" / "out.json").read_text()) == shaped(333)


def test_automator_run_with_no_items_leaves_the_file_alone(automator_cli: Any, tmp_path: Path) -> None:
    (tmp_path / "wf").mkdir()
    (tmp_path / "wf" / "out.jsonl").write_text("kept\n")
    result = run(automator_cli, tmp_path / "wf", "{path: out.jsonl}", items=0)

    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "wf" / "out.jsonl").read_text() == "kept\n"
    assert parts_folders(tmp_path / "wf") == []
