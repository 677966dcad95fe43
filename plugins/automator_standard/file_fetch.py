"""file.fetch: items from local JSON, JSONL or CSV files (globs allowed)."""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from automator import FetchStep, StepConfig, StepError, hookimpl
from automator_standard._paths import as_item_list, dig

FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


class FileFetchConfig(StepConfig):
    path: str = Field(description="A file or a glob (data/*.jsonl), relative to the workflow file's folder.")
    format: Literal["auto", "json", "jsonl", "csv"] = Field(
        "auto", description="auto picks by extension: .json, .jsonl/.ndjson, .csv."
    )
    items: str | None = Field(None, description="JSON files: dotted path to the list of items.")
    encoding: str = "utf-8"
    delimiter: str = Field(",", min_length=1, max_length=1, description="CSV files: the field separator.")
    missing_ok: bool = Field(False, description="No matching file yields no items instead of an error.")
    add_source: bool = Field(False, description="Add _source (file name) and _line to each item.")


class FileFetch(FetchStep[FileFetchConfig]):
    name = "file.fetch"
    description = "Read items from local JSON, JSONL or CSV files; globs allowed."
    blocking = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._files: list[Path] = []
        self._count = 0

    def fetch(self) -> Iterator[Any]:
        """The files' items, one file after another, read as they are consumed (a million-line
        JSONL file is never in memory at once; a JSON document is read whole)."""
        pattern = str(self.resolve_path(self.render_text(self.config.path)))
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files and not self.config.missing_ok:
            raise StepError(f"no file matches {pattern}", retryable=False)
        self._files = files
        for file in files:
            for line, item in self._read(file):
                self._count += 1
                if self.config.add_source and isinstance(item, dict):
                    item = {**item, "_source": file.name, "_line": line}
                yield item

    def _read(self, file: Path) -> Iterator[tuple[int, Any]]:
        fmt = self.config.format if self.config.format != "auto" else FORMATS.get(file.suffix.lower())
        if fmt is None:
            raise StepError(f"{file}: unknown file type; set format: json, jsonl or csv", retryable=False)
        try:
            with file.open(encoding=self.config.encoding, newline="") as handle:
                if fmt == "csv":
                    reader = csv.DictReader(handle, delimiter=self.config.delimiter)
                    for number, row in enumerate(reader):
                        yield number + 2, row
                elif fmt == "jsonl":
                    for number, line in enumerate(handle, start=1):
                        if line.strip():
                            yield number, _json_line(line, file, number)
                else:
                    document = json.load(handle)
                    what = str(file)
                    yield from enumerate(as_item_list(dig(document, self.config.items, what=what), what=what), 1)
        except json.JSONDecodeError as exc:
            raise StepError(f"{file}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}", retryable=False) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise StepError(f"cannot read {file}: {exc}", retryable=False) from None

    def summary(self) -> str | None:
        names = ", ".join(str(f) for f in self._files[:3]) + (" ..." if len(self._files) > 3 else "")
        return f"read {self._count} items from {names or 'no files'}"


def _json_line(line: str, file: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise StepError(f"{file}:{number}:{exc.colno}: not valid JSON: {exc.msg}", retryable=False) from None


@hookimpl
def register_step_types(register: Any) -> None:
    register(FileFetch)
