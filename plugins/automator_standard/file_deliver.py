"""file.deliver: write the run's items to a JSONL, JSON or CSV file, atomically.

The engine hands a deliver step its items chunk by chunk, several chunks at once and in
any order, and counts a chunk's items as delivered when ``deliver_batch`` returns. So each
chunk goes durably into a part file of its own, in a hidden folder beside the target::

    out/.items.jsonl.automator-run-42-save/000000000100.part   (the chunk whose first item is 100)

and ``close()``, at the end of the run, assembles the parts in item order into the target.
Delivering a chunk again (a retry, or a resumed run after a crash, possibly in another
process) replaces its part: each item is in the file once, by construction.

A part is one JSON line saying which items it holds (and, for CSV, its columns), then
the chunk already in the file's format, so assembling is mostly copying bytes.

Assembling survives a crash at any point without writing an item twice:

1. ``assembling.tmp`` (in the folder) gets the whole new file — for ``mode: append`` a
   copy of the target followed by the parts — and is synced;
2. it is renamed to ``assembled-N`` (N items): the commit point. From here on the parts
   are redundant;
3. the parts are deleted, ``assembled-N`` replaces the target, the folder goes.

A close that finds ``assembled-N`` finishes steps 3 (it never assembles again, so an
append is never doubled); one that finds parts and no ``assembled-N`` starts at step 1
(the target was not touched). Readers see the old target or the new one, never half.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import Field

from automator import DeliverStep, Item, StepConfig, StepError, hookimpl

SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
PART_SUFFIX = ".part"
ASSEMBLING = "assembling.tmp"
ASSEMBLED_PREFIX = "assembled-"  # + the item count, for the summary of a close that finishes it
# one encoder for every line: json.dumps with options builds a new one per call
_json_line = json.JSONEncoder(ensure_ascii=False, default=str).encode


class FileDeliverConfig(StepConfig):
    path: str = Field(
        description="Output file, relative to the workflow file's folder; templates such as {{ run.id }} allowed."
    )
    format: Literal["auto", "jsonl", "json", "csv"] = Field("auto", description="auto picks by extension.")
    mode: Literal["overwrite", "append"] = Field("overwrite", description="Replace the file, or add to it.")
    fields: list[str] | None = Field(None, description="CSV: the columns, in order (default: every key seen).")


@dataclass(frozen=True)
class _Part:
    """A part file, as its first line describes it."""

    path: Path
    first: int  # the seq of its first item (also its file name)
    last: int
    count: int
    written: int  # time.time_ns() when it was written: the newer of two overlapping parts wins
    columns: tuple[str, ...] | None  # CSV only: the columns its rows are written in


class FileDeliver(DeliverStep[FileDeliverConfig]):
    name = "file.deliver"
    description = "Write items to a JSONL, JSON or CSV file (atomically: all or nothing)."
    blocking = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # chunks are delivered from several worker threads at once
        self._lock = threading.Lock()
        self._target: Path | None = None
        self._delivered = 0  # items this instance put into parts
        self._assembled: int | None = None  # items close() put into the target
        self._checked_list = False  # json, append: the target was found to be a JSON list

    # -- where things go ------------------------------------------------------------------

    def _target_path(self) -> Path:
        """The rendered target; rendered once, so every chunk of the run lands in one folder."""
        with self._lock:
            if self._target is None:
                self._target = self.resolve_path(self.render_text(self.config.path))
            return self._target

    def _parts_folder(self, target: Path) -> Path:
        # by run id (a resumed run finds its parts) and step id (two steps may share a target)
        return target.parent / f".{target.name}.automator-run-{self.context.run_id}-{self.step_id}"

    def _format(self, path: Path) -> str:
        if self.config.format != "auto":
            return self.config.format
        fmt = SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise StepError(f"{path}: unknown file type; set format: jsonl, json or csv", retryable=False)
        return fmt

    # -- one chunk ------------------------------------------------------------------------

    def deliver_batch(self, items: list[Item]) -> None:
        if not items:
            return
        target = self._target_path()
        fmt = self._format(target)
        if fmt == "json" and self.config.mode == "append" and not self._checked_list:
            # fail the items now, not the assembly at the end: a file that is no list takes none
            _check_json_list(target)
            self._checked_list = True
        # a model answer, a fetched body or a template may quote a secret: files keep none
        rows = [self.context.redactor.data(item.data) for item in items]
        columns: list[str] | None = None
        if fmt == "jsonl":
            body = "\n".join(map(_json_line, rows)) + "\n"  # rows is never empty here
        elif fmt == "json":
            # the list's elements as json.dumps(indent=2) lays them out inside "[\n" ... "\n]"
            body = json.dumps(rows, ensure_ascii=False, indent=2, default=str)[2:-2]
        else:
            columns = self.config.fields or _keys_seen(rows)
            body = _csv_rows(rows, columns)
        seqs = [item.seq for item in items]
        header: dict[str, Any] = {"first": min(seqs), "last": max(seqs), "count": len(items), "written": time.time_ns()}
        if columns is not None:
            header["columns"] = columns
        folder = self._parts_folder(target)
        _write_part(folder, f"{header['first']:012d}{PART_SUFFIX}", json.dumps(header) + "\n" + body)
        with self._lock:
            self._delivered += len(items)

    # -- the end of the run ---------------------------------------------------------------

    async def close(self) -> None:
        if self._target is None:
            try:
                self._target_path()
            except StepError:
                # nothing was delivered in this process, and the path does not render:
                # no earlier process of this run can have delivered to it either
                return
        assert self._target is not None
        # assembling copies every part: off the event loop
        await asyncio.to_thread(self._finish, self._target)

    def _finish(self, target: Path) -> None:
        folder = self._parts_folder(target)
        if not folder.is_dir():
            return  # nothing delivered: the target stays as it is
        try:
            finished = _finish_committed(folder, target)
            parts = _current_parts(folder)
            assembled = self._assemble(folder, target, parts, add=finished is not None) if parts else 0
            _remove_folder(folder)
        except OSError as exc:
            raise StepError(
                f"cannot write {target}: {exc.strerror or exc} (the delivered items stay in {folder.name}; "
                "resuming the run writes them)",
                retryable=False,
            ) from None
        if finished is not None or parts:
            self._assembled = (finished or 0) + assembled

    def _assemble(self, folder: Path, target: Path, parts: list[_Part], *, add: bool) -> int:
        """Steps 1 to 3 of the module docstring; ``add``: append even in overwrite mode."""
        fmt = self._format(target)
        append = add or self.config.mode == "append"
        count = sum(part.count for part in parts)
        fd = _create(folder / ASSEMBLING, mode_of=target)
        with os.fdopen(fd, "wb") as out:
            old_size = _copy_existing(target, out, fmt) if append else 0
            if fmt == "jsonl":
                for part in parts:
                    _copy_body(part, out)
            elif fmt == "json":
                out.write(b",\n" if old_size else b"[\n")
                for index, part in enumerate(parts):
                    if index:
                        out.write(b",\n")
                    _copy_body(part, out)
                out.write(b"\n]\n")
            else:
                columns = self.config.fields or _union(part.columns or () for part in parts)
                text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
                if not old_size:
                    text.write(_csv_header(columns))
                for part in parts:
                    if part.columns == tuple(columns):
                        _copy_body(part, out)
                    else:
                        _copy_csv_aligned(part, columns, text)
                text.detach()
            out.flush()
            os.fsync(out.fileno())
        committed = folder / f"{ASSEMBLED_PREFIX}{count}"
        os.replace(folder / ASSEMBLING, committed)
        _sync_folder(folder)
        _finish_committed(folder, target)
        return count

    def summary(self) -> str | None:
        count = self._assembled if self._assembled is not None else self._delivered
        if not count or self._target is None:
            return None
        return f"wrote {count} items to {self._target}"


# -- parts ----------------------------------------------------------------------------------


def _write_part(folder: Path, name: str, text: str) -> None:
    """The part, whole or not at all: its items count as delivered on return.

    Its data is synced, as any file this step writes; the folder is not, per part (that
    doubled the time per chunk): a power cut may lose the newest parts' names, as it
    may lose the history's newest commits (SQLite runs with synchronous=NORMAL), and the
    resumed run delivers those chunks again.
    """
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # parts hold items: for the owner only
        temp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(text.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, folder / name)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise StepError(f"cannot write {folder / name}: {exc.strerror or exc}", retryable=False) from None


def _current_parts(folder: Path) -> list[_Part]:
    """The parts in item order; of two that share items (a chunk re-formed after a crash), the newer."""
    parts: list[_Part] = []
    for path in folder.iterdir():
        if path.name.endswith(PART_SUFFIX):
            with path.open("rb") as handle:
                header = json.loads(handle.readline())
            columns = header.get("columns")
            parts.append(
                _Part(
                    path,
                    header["first"],
                    header["last"],
                    header["count"],
                    header["written"],
                    tuple(columns) if columns is not None else None,
                )
            )
    parts.sort(key=lambda p: (p.first, p.last))
    kept: list[_Part] = []
    for part in parts:
        # a chunk's items are a range of seqs no other chunk's range overlaps, so an overlap
        # is the same chunk delivered twice with different first items: keep the newer
        while kept and kept[-1].last >= part.first:
            if kept[-1].written > part.written:
                break
            kept.pop()
        else:
            kept.append(part)
    return kept


def _copy_body(part: _Part, out: IO[bytes]) -> None:
    with part.path.open("rb") as handle:
        handle.readline()  # the part's description
        shutil.copyfileobj(handle, out, 1 << 20)


def _copy_csv_aligned(part: _Part, columns: list[str], out: IO[str]) -> None:
    """A CSV part written with other columns (its chunk saw other keys): its rows in ``columns``."""
    with part.path.open("rb") as handle:
        handle.readline()
        rows = csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8", newline=""), fieldnames=part.columns)
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        for row in rows:
            writer.writerow(row)


def _finish_committed(folder: Path, target: Path) -> int | None:
    """Step 3 for an ``assembled-N`` in the folder (this close's, or a crashed one's): N, or None."""
    committed = next((p for p in folder.iterdir() if p.name.startswith(ASSEMBLED_PREFIX)), None)
    if committed is None:
        return None
    for path in folder.iterdir():
        if path.name.endswith(PART_SUFFIX):
            path.unlink()
    _sync_folder(folder)  # the parts are gone before the target changes: never assembled twice
    os.replace(committed, target)
    _sync_folder(target.parent)
    return int(committed.name.removeprefix(ASSEMBLED_PREFIX))


def _remove_folder(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()  # leftovers of a crash: a half-written part or assembling.tmp
    folder.rmdir()


# -- formats --------------------------------------------------------------------------------


def _copy_existing(target: Path, out: IO[bytes], fmt: str) -> int:
    """Append mode: the target's content, ready for more items after it; its size (0: none)."""
    try:
        handle = target.open("rb")
    except FileNotFoundError:
        return 0
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if fmt == "json":
            cut = _json_list_end(handle, size, target)
            if cut is None:
                return 0  # empty, or an empty list: written as a new list
            handle.seek(0)
            _copy_bytes(handle, out, cut)
            return size
        shutil.copyfileobj(handle, out, 1 << 20)
        if size:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                out.write(b"\n")  # a last line without its newline: the next item starts a line
        return size


def _check_json_list(target: Path) -> None:
    try:
        with target.open("rb") as handle:
            _json_list_end(handle, os.fstat(handle.fileno()).st_size, target)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StepError(f"cannot read {target}: {exc.strerror or exc}", retryable=False) from None


def _json_list_end(handle: IO[bytes], size: int, target: Path) -> int | None:
    """Where the last element of the JSON list in ``handle`` ends; None for no element."""
    tail = _last_non_blank(handle, size)
    if tail is None:
        return None
    end, char = tail
    if char != b"]":
        raise StepError(f"{target}: cannot append, the file is not a JSON list", retryable=False)
    before = _last_non_blank(handle, end)
    if before is None:
        raise StepError(f"{target}: cannot append, the file is not a JSON list", retryable=False)
    if before[1] == b"[" and _last_non_blank(handle, before[0]) is None:
        return None
    return before[0] + 1


def _last_non_blank(handle: IO[bytes], end: int) -> tuple[int, bytes] | None:
    """The offset and byte of the last non-whitespace byte before ``end``, reading backwards."""
    position = end
    while position > 0:
        start = max(0, position - 4096)
        handle.seek(start)
        block = handle.read(position - start)
        stripped = block.rstrip()
        if stripped:
            offset = start + len(stripped) - 1
            return offset, block[len(stripped) - 1 : len(stripped)]
        position = start
    return None


def _copy_bytes(source: IO[bytes], out: IO[bytes], count: int) -> None:
    while count > 0:
        block = source.read(min(count, 1 << 20))
        if not block:
            break
        out.write(block)
        count -= len(block)


def _keys_seen(rows: Iterable[Any]) -> list[str]:
    return list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))


def _union(column_lists: Iterable[Iterable[str]]) -> list[str]:
    """Every column of the parts, in order of first appearance (the parts are in item order)."""
    return list(dict.fromkeys(c for columns in column_lists for c in columns))


def _csv_header(columns: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(columns)
    return buffer.getvalue()


def _csv_rows(rows: list[Any], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()} if isinstance(row, dict) else {})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else value


# -- files ----------------------------------------------------------------------------------


def _create(path: Path, *, mode_of: Path) -> int:
    """A new, empty ``path`` with the mode ``mode_of`` has, or a new file's (0666 less the umask).

    ``mkstemp`` would make it 0600 whatever the umask, unreadable to the group that reads
    the output.
    """
    try:
        mode: int | None = stat.S_IMODE(mode_of.stat().st_mode)
    except FileNotFoundError:
        mode = None
    path.unlink(missing_ok=True)  # left by a close that crashed while writing it
    # 0o666: the kernel takes the umask off, as for any new file
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    if mode is not None:
        os.fchmod(fd, mode)
    return fd


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@hookimpl
def register_step_types(register: Any) -> None:
    register(FileDeliver)
