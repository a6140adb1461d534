"""One output layer for every command that prints rows: a table for people, JSON, JSON lines, CSV; and the
results file of ``-o``, written atomically.

Rows are plain dicts (what ``to_dict()`` gives). JSON arrays are streamed element by element, so a long run
shows results as they come and an interrupted one still printed what finished. Only data goes to ``stream``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TextIO

FORMATS = ("table", "json", "jsonl", "csv")
CLASSIFICATION_CSV_COLUMNS = ("input", "model", "architecture", "rank", "class_id", "label", "score", "error")


def write_json_array(rows: Iterable[dict[str, Any]], stream: TextIO) -> int:
    """Stream ``rows`` as one JSON array (``[]`` when empty); returns how many were written."""
    count = 0
    for row in rows:
        stream.write("[\n  " if count == 0 else ",\n  ")
        stream.write(json.dumps(row, ensure_ascii=False))
        stream.flush()
        count += 1
    stream.write("[]\n" if count == 0 else "\n]\n")
    stream.flush()
    return count


def write_json_lines(rows: Iterable[dict[str, Any]], stream: TextIO) -> int:
    """One JSON object per line, flushed as each arrives (for ``| jq`` and streaming consumers)."""
    count = 0
    for row in rows:
        stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        stream.flush()
        count += 1
    return count


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A plain aligned text table; ``align`` has one 'l' or 'r' per column (default: all left)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = align or "l" * len(headers)
    lines = []
    for row in cells:
        parts = [cell.rjust(w) if a == "r" else cell.ljust(w) for cell, w, a in zip(row, widths, align)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def checks_table(rows: Iterable[dict[str, Any]], stream: TextIO, width: int) -> int:
    """``doctor``'s checks for people, within ``width`` columns: check, status and value side by side, the value
    wrapped under itself, and a hint on its own line below its check (rows have ``check``, ``value``,
    ``status``, ``hint``). Rows are written as they come, so a slow check shows the ones before it."""
    import textwrap

    check_width, status_width = 22, 6  # the longest check name and status the checks have (wider ones push)
    count = 0
    for row in rows:
        if count == 0:
            stream.write(f"{'check'.ljust(check_width)}  {'status'.ljust(status_width)}  value\n")
        name = str(row["check"])
        indent = check_width + status_width + 4
        room = max(20, width - indent)
        value = textwrap.wrap(str(row["value"]), room, break_on_hyphens=False) or [""]
        first = f"{name.ljust(check_width)}  {str(row['status']).ljust(status_width)}  "
        if len(first) > indent:  # a long check name: its value starts on the next line
            stream.write(first.rstrip() + "\n")
            first = ""
        stream.write(first.ljust(indent) + value[0] + "\n")
        for line in value[1:]:
            stream.write(" " * indent + line + "\n")
        if row.get("hint"):
            for line in textwrap.wrap(f"hint: {row['hint']}", max(20, width - indent - 2), break_on_hyphens=False):
                stream.write(" " * (indent + 2) + line + "\n")
        stream.flush()
        count += 1
    return count


def classification_tables(rows: Iterable[dict[str, Any]], stream: TextIO) -> int:
    """Human-readable output of classification results: a small top-k table per input."""
    count = 0
    for row in rows:
        if count:
            stream.write("\n")
        architecture = row.get("architecture") or row["model"]
        # A fine-tune is named by its weights; its architecture beside it.
        named = row["model"] if architecture == row["model"] else f"{row['model']}, {architecture}"
        header = f"{row['input']}  ({named})"
        if "error" in row:
            stream.write(f"{header}\n  error: {row['error']['message']}\n")
        else:
            table = format_table(
                ["rank", "score", "class", "label"],
                [
                    [rank, f"{p['score']:.4f}", p["class_id"], p["label"]]
                    for rank, p in enumerate(row["predictions"], start=1)
                ],
                align="rrrl",
            )
            stream.write(header + "\n" + "\n".join("  " + line for line in table.splitlines()) + "\n")
            cam = row.get("cam")
            if cam and cam.get("file"):
                stream.write(f"  map of class {cam['class_id']} ({cam['label']}): {cam['file']}\n")
        stream.flush()
        count += 1
    return count


def write_csv(rows: Iterable[dict[str, Any]], columns: Sequence[str], stream: TextIO) -> int:
    """CSV with a header line; one line per row, flushed as each arrives."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(columns)
    count = 0
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in columns])
        stream.flush()
        count += 1
    return count


def _csv_cell(value: Any) -> Any:
    """A CSV cell: a missing value empty, booleans as JSON writes them (``true``/``false``, not Python's ``True``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _classification_csv_rows(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for row in rows:
        if "error" in row:
            yield {"input": row["input"], "model": row["model"], "architecture": row.get("architecture"),
                   "error": row["error"]["message"]}
            continue
        for rank, prediction in enumerate(row["predictions"], start=1):
            yield {"input": row["input"], "model": row["model"], "architecture": row.get("architecture"),
                   "rank": rank, **prediction}


def write_classifications(rows: Iterable[dict[str, Any]], fmt: str, stream: TextIO) -> int:
    """Classification results (``ClassificationResult.to_dict()``) in any output format."""
    if fmt == "csv":
        return write_csv(_classification_csv_rows(rows), CLASSIFICATION_CSV_COLUMNS, stream)
    if fmt == "table":
        return classification_tables(rows, stream)
    return write_rows(rows, fmt, stream)


def write_rows(rows: Iterable[dict[str, Any]], fmt: str, stream: TextIO, *, headers: Sequence[str] | None = None) -> int:
    """Flat rows in any output format; ``headers`` picks and orders the table/CSV columns (default: all keys)."""
    if fmt == "json":
        return write_json_array(rows, stream)
    if fmt == "jsonl":
        return write_json_lines(rows, stream)
    materialised = list(rows)
    columns = list(headers or (materialised[0].keys() if materialised else []))
    if fmt == "csv":
        return write_csv(materialised, columns, stream)
    if materialised:
        stream.write(format_table(columns, [[_cell(r.get(c)) for c in columns] for r in materialised]) + "\n")
    return len(materialised)


def _cell(value: Any) -> Any:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return value


# Temporary files of -o outputs being written: what an interrupt that ends the process at once removes.
UNFINISHED_OUTPUTS: set[Path] = set()


class AtomicOutput:
    """``-o FILE``, written to a temporary file beside it and renamed over it only when complete: an interrupted
    or failed run never leaves a half-written results file, nor destroys the previous one. (click's own atomic
    files rename even when the block fails.)"""

    def __init__(self, path: Path) -> None:
        from .base.files import temporary_path

        self.path = path
        self.temporary = temporary_path(path)
        UNFINISHED_OUTPUTS.add(self.temporary)
        # open() gives the mode a plain file gets under the umask (mkstemp would give 0600).
        self.stream = open(self.temporary, "x", encoding="utf-8")

    def __enter__(self) -> Any:
        return self.stream

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            self.stream.close()
            if exc_type is None:
                os.replace(self.temporary, self.path)
        finally:
            self.temporary.unlink(missing_ok=True)
            UNFINISHED_OUTPUTS.discard(self.temporary)
