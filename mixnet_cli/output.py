"""One output layer for every command that prints rows: a table for people, JSON, JSON lines.

Rows are plain dicts (what ``to_dict()`` gives). JSON arrays are streamed element by element, so a long run
shows results as they come and an interrupted one still printed what finished. Only data goes to ``stream``.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Sequence, TextIO

FORMATS = ("table", "json", "jsonl")


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


def classification_tables(rows: Iterable[dict[str, Any]], stream: TextIO) -> int:
    """Human-readable output of classification results: a small top-k table per input."""
    count = 0
    for row in rows:
        if count:
            stream.write("\n")
        header = f"{row['input']}  ({row['model']})"
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
        stream.flush()
        count += 1
    return count


def write_rows(
    rows: Iterable[dict[str, Any]],
    fmt: str,
    stream: TextIO,
    *,
    headers: Sequence[str] | None = None,
    table: Any = None,
) -> int:
    """Write ``rows`` in ``fmt``. For ``table``, ``table`` is a callable(rows, stream) or ``headers`` picks columns."""
    if fmt == "json":
        return write_json_array(rows, stream)
    if fmt == "jsonl":
        return write_json_lines(rows, stream)
    if table is not None:
        return table(rows, stream)
    materialised = list(rows)
    columns = list(headers or (materialised[0].keys() if materialised else []))
    if materialised:
        stream.write(format_table(columns, [[r.get(c) for c in columns] for r in materialised]) + "\n")
    return len(materialised)


def tee_count(rows: Iterable[dict[str, Any]], counter: list[int], key: str) -> Iterator[dict[str, Any]]:
    """Pass rows through, counting those that have ``key`` (e.g. how many results were errors)."""
    for row in rows:
        if key in row:
            counter[0] += 1
        yield row
