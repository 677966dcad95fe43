"""file.deliver: write the run's items to a JSONL, JSON or CSV file, atomically."""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from automator import DeliverStep, Item, StepConfig, StepError, hookimpl

SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}


class FileDeliverConfig(StepConfig):
    path: str = Field(
        description="Output file, relative to the workflow file's folder; templates such as {{ run.id }} allowed."
    )
    format: Literal["auto", "jsonl", "json", "csv"] = Field("auto", description="auto picks by extension.")
    mode: Literal["overwrite", "append"] = Field("overwrite", description="Replace the file, or add to it.")
    fields: list[str] | None = Field(None, description="CSV: the columns, in order (default: every key seen).")


class FileDeliver(DeliverStep[FileDeliverConfig]):
    name = "file.deliver"
    description = "Write items to a JSONL, JSON or CSV file (atomically: all or nothing)."
    blocking = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._written: tuple[int, Path] | None = None

    def _format(self, path: Path) -> str:
        if self.config.format != "auto":
            return self.config.format
        fmt = SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise StepError(f"{path}: unknown file type; set format: jsonl, json or csv", retryable=False)
        return fmt

    def deliver_batch(self, items: list[Item]) -> None:
        path = self.resolve_path(self.render_text(self.config.path))
        fmt = self._format(path)
        # a model answer, a fetched body or a template may quote a secret: files keep none
        rows = [self.context.redactor.data(item.data) for item in items]
        existing = ""
        if self.config.mode == "append" and path.exists():
            existing = path.read_text(encoding="utf-8")
        if fmt == "jsonl":
            text = existing + "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
        elif fmt == "json":
            previous = json.loads(existing) if existing.strip() else []
            text = json.dumps([*previous, *rows], ensure_ascii=False, indent=2, default=str) + "\n"
        else:
            text = existing + self._csv(rows, header=not existing)
        _write_atomically(path, text)
        self._written = (len(rows), path)

    def _csv(self, rows: list[Any], *, header: bool) -> str:
        columns = self.config.fields or list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        if header:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()} if isinstance(row, dict) else {})
        return buffer.getvalue()

    def summary(self) -> str | None:
        if self._written is None:
            return None
        count, path = self._written
        return f"wrote {count} items to {path}"


def _cell(value: Any) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else value


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of it.

    The file gets the mode any program's new file gets (0666 less the umask), or keeps the
    mode it had: ``mkstemp`` would make it 0600 whatever the umask, unreadable to the
    group that reads the output.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = _create_temp(path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise StepError(f"cannot write {path}: {exc.strerror or exc}", retryable=False) from None


def _create_temp(path: Path) -> tuple[int, str]:
    """A new, exclusive temporary file beside ``path``, with the mode ``path`` has or will get."""
    try:
        mode: int | None = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = None
    while True:
        temp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            # 0o666: the kernel takes the umask off, as for any new file
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        if mode is not None:
            os.fchmod(fd, mode)
        return fd, temp


@hookimpl
def register_step_types(register: Any) -> None:
    register(FileDeliver)
