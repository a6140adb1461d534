"""Where a job's images are: its sources listed lazily, as ``mixnet classify`` expands them (local files,
directories, globs, URLs) plus pyarrow URIs a directory level at a time, and manifests (text, Parquet, CSV) a
batch at a time; what cannot be listed becomes a failed row."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator, NamedTuple

from ..base.errors import ImageNotFoundError, ImageUnreadableError, MixnetError, UsageError
from ..images.inputs import (IMAGE_SUFFIXES, NoImagesError, display_name, expand_inputs, is_url,
                             iter_glob)
from .extra import _filesystem, _import_pyarrow
from .rows import canonical_key, is_uri

if TYPE_CHECKING:
    from ..classifier import ClassificationResult


_GLOB_CHARS = frozenset("*?[")
_MANIFEST_TABLE_SUFFIXES = (".parquet", ".pq", ".csv")


class InputRow(NamedTuple):
    """One input of a job as the driver streams it: ``input`` (the name as given, what the row shows), ``key``
    (:func:`canonical_key`), ``path`` (bytes the actor opens: an absolute local path as ``os.fsencode`` gives it, so
    a name that is not UTF-8 still opens, or the URI/URL) and ``error`` (found while listing: a directory with no
    images, a glob that matches nothing; then ``path`` is None)."""

    input: str
    key: str
    path: bytes | None
    error: MixnetError | None = None


def _local_row(name: str, path: str) -> InputRow:
    absolute = os.path.abspath(path)
    return InputRow(display_name(name), display_name(os.path.normpath(absolute)), os.fsencode(absolute))


def _uri_row(uri: str) -> InputRow:
    return InputRow(display_name(uri), canonical_key(uri), uri.encode("utf-8", "surrogateescape"))


def _failed_row(name: str, error: MixnetError) -> InputRow:
    shown = display_name(name)
    return InputRow(shown, canonical_key(name), None, error)


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _no_images(label: str, recursive: bool) -> NoImagesError:
    where = "or its sub-directories " if recursive else ""
    return NoImagesError(f"{label}: directory {where}has no image files ({', '.join(sorted(IMAGE_SUFFIXES)[:6])}...)")


def _walk_uri(source: str, recursive: bool) -> Iterator[InputRow]:
    """The image files under a URI, one directory level listed at a time (so a prefix of millions of objects is
    never held whole: the largest single level is), by the suffixes of :data:`IMAGE_SUFFIXES`, sorted within a
    level, hidden entries skipped; the source's own error as a failed row."""
    pa = _import_pyarrow()
    filesystem, path = _filesystem(source)
    try:
        info = filesystem.get_file_info(path)
    except PermissionError:
        yield _failed_row(source, ImageUnreadableError(f"{source}: permission denied; check the permissions"))
        return
    except OSError as exc:
        yield _failed_row(source, ImageUnreadableError(f"{source}: cannot list ({exc}); check the path and credentials"))
        return
    if info.type == pa.fs.FileType.File:
        yield _uri_row(source)
        return
    if info.type != pa.fs.FileType.Directory:
        yield _failed_row(source, ImageNotFoundError(f"{source}: no such file or directory; check the path"))
        return
    base = path.rstrip("/")
    prefix = source.rstrip("/")
    found = False
    stack = [path]
    while stack:
        directory = stack.pop()
        try:
            entries = filesystem.get_file_info(pa.fs.FileSelector(directory, recursive=False))
        except OSError as exc:
            shown = prefix + "/" + directory[len(base):].lstrip("/") if directory != path else source
            yield _failed_row(shown, ImageUnreadableError(f"{shown}: cannot list ({exc}); check the path and credentials"))
            continue
        below = []
        for entry in sorted(entries, key=lambda entry: entry.path):
            relative = entry.path[len(base):].lstrip("/")
            if _hidden(relative):
                continue
            if entry.type == pa.fs.FileType.Directory:
                if recursive:
                    below.append(entry.path)
            elif entry.type == pa.fs.FileType.File and _is_image_name(entry.base_name):
                found = True
                yield _uri_row(f"{prefix}/{relative}")
        stack.extend(reversed(below))
    if not found:
        yield _failed_row(source, _no_images(source, recursive))


def _walk_local(argument: str, recursive: bool) -> Iterator[InputRow]:
    """A local argument as ``mixnet classify`` expands it (same names, filter and errors), lazily: a directory one
    level at a time (sorted within it), a glob match by match."""
    label = display_name(argument)
    path = Path(argument).expanduser()
    if path.is_dir():
        found = False
        unreadable: list[str] = []

        def listing_failed(error: OSError) -> None:
            if error.filename is not None:
                unreadable.append(str(error.filename))

        for root, dirs, files in os.walk(path, followlinks=False, onerror=listing_failed):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
            for name in sorted(files):
                if _is_image_name(name):
                    full = os.path.join(root, name)
                    if os.path.isfile(full):
                        found = True
                        yield _local_row(full, full)
            while unreadable:
                shown = display_name(unreadable.pop())
                yield _failed_row(shown, ImageUnreadableError(f"{shown}: directory cannot be read (permission "
                                                              "denied?); check its permissions"))
                found = True  # said already: not also "has no image files"
        if not found:
            yield _failed_row(label, _no_images(label, recursive))
        return
    if not os.path.lexists(path) and _GLOB_CHARS & set(argument):
        found = False
        for match in iter_glob(argument):  # classify's rule: ** follows no symlinked folder
            if _is_image_name(os.path.basename(match)) and os.path.isfile(match):
                found = True
                yield _local_row(match, match)
        if not found:
            yield _failed_row(label, NoImagesError(f"{label}: pattern matches no image files"))
        return
    for item in expand_inputs([argument], recursive=recursive):  # one file: classify's checks, word for word
        if item.problem is not None:
            yield _failed_row(item.name, item.problem)
        else:
            yield _local_row(item.name, str(path))


def _manifest_entries(files_from: str, column: str | None, stdin: BinaryIO | None) -> Iterator[str]:
    """The entries of a manifest, lazily: a text file (one path or URI a line; blank lines and ``#`` comments
    skipped; ``-`` for stdin), or the column ``column`` of a Parquet or CSV file (read a batch at a time)."""
    pa = _import_pyarrow()
    if _is_table_manifest(files_from, column):
        column = column or "path"
        try:
            if files_from.lower().endswith(".csv"):
                reader: Any = pa.csv.open_csv(files_from, convert_options=pa.csv.ConvertOptions(
                    include_columns=[column], column_types={column: pa.string()}))
                batches: Iterable[Any] = reader
            else:
                batches = pa.parquet.ParquetFile(files_from).iter_batches(columns=[column], batch_size=65_536)
            for batch in batches:
                for value in batch.column(0).to_pylist():
                    if value:
                        yield value
        except (pa.ArrowException, OSError, KeyError, IndexError) as exc:
            raise UsageError(f"--files-from {files_from}: cannot read column {column!r} ({exc}); name the column "
                             "with --files-from-column") from None
        return
    stream = (stdin if stdin is not None else sys.stdin.buffer) if files_from == "-" else open(files_from, "rb")
    try:
        for raw in stream:
            line = raw.decode("utf-8", "surrogateescape").strip()
            if line and not line.startswith("#"):
                yield line
    finally:
        if stream is not sys.stdin.buffer and stream is not stdin:
            stream.close()


def _manifest_row(entry: str) -> InputRow:
    """One manifest entry: a file or URI, taken as it is (no look at the disk in the driver; the actor says
    when it is missing or not an image)."""
    if is_url(entry) or is_uri(entry):
        return _uri_row(entry)
    return _local_row(entry, os.path.expanduser(entry))


def _is_table_manifest(files_from: str, column: str | None) -> bool:
    return files_from != "-" and (column is not None or files_from.lower().endswith(_MANIFEST_TABLE_SUFFIXES))


def check_manifest(files_from: str | None, column: str | None = None) -> None:
    """Fail before anything starts when ``--files-from`` names no readable file, or a Parquet or CSV file without
    the column (only its schema or header is read)."""
    if files_from is None or files_from == "-":
        if column is not None and files_from == "-":
            raise UsageError("--files-from-column names a column of a Parquet or CSV file; stdin is read as text")
        return
    path = os.path.expanduser(files_from)
    if not os.path.isfile(path):
        raise UsageError(f"--files-from {files_from}: no such file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"--files-from {files_from}: permission denied")
    if not _is_table_manifest(files_from, column):
        return
    pa = _import_pyarrow()
    column = column or "path"
    try:
        if files_from.lower().endswith(".csv"):
            names = next(iter(pa.csv.open_csv(path))).schema.names
        else:
            names = pa.parquet.read_schema(path).names
    except (pa.ArrowException, OSError, StopIteration) as exc:
        raise UsageError(f"--files-from {files_from}: cannot read it as {'CSV' if path.lower().endswith('.csv') else 'Parquet'} "
                         f"({exc}); give a text file with one path a line, or a Parquet or CSV file") from None
    if column not in names:
        raise UsageError(f"--files-from {files_from}: no column {column!r} (it has {', '.join(names[:8])}); name "
                         "the column of paths with --files-from-column")


def iter_inputs(
    sources: Iterable[str],
    *,
    files_from: str | None = None,
    files_from_column: str | None = None,
    recursive: bool = True,
    stdin: BinaryIO | None = None,
) -> Iterator[InputRow]:
    """Every input of a job, lazily and in order: ``sources`` expanded as ``mixnet classify`` expands them (local
    files, directories, globs, http(s) URLs; the same names, filter and errors) plus pyarrow URIs (``s3://``...,
    listed a directory level at a time), then each entry of the manifest ``files_from`` (see
    :func:`_manifest_entries`; each entry one file or URI, not expanded). Nothing is listed before it is asked for:
    memory stays flat however many inputs there are. Raises :class:`UsageError` for ``-`` among ``sources`` or a
    manifest that cannot be read."""
    for source in sources:
        if source == "-":
            raise UsageError("classify-dataset reads files, not stdin: name files, directories or URIs "
                             "(or a list of them with --files-from -)")
        if is_url(source):
            yield InputRow(source, canonical_key(source), source.encode())
        elif is_uri(source):
            yield from _walk_uri(source, recursive)
        else:
            try:
                yield from _walk_local(source, recursive)
            except PermissionError:
                yield _failed_row(source, ImageUnreadableError(f"{display_name(source)}: permission denied; check "
                                                               "the permissions"))
    if files_from is not None:
        for entry in _manifest_entries(files_from, files_from_column, stdin):
            yield _manifest_row(entry)


@dataclass(frozen=True)
class InputListing:
    """What a job's sources name: ``rows`` to classify ({"input", "key", "path"}) and the ``failures`` found
    while listing (a directory with no images, a glob that matches nothing, a broken link)."""

    rows: list[dict[str, Any]]
    failures: list["ClassificationResult"]


def list_inputs(sources: Iterable[str], model_name: str, *, recursive: bool = True) -> InputListing:
    """:func:`iter_inputs` held in memory, for a Ray ``Dataset`` made from it (:func:`classify_dataset`)."""
    from ..classifier import ClassificationResult

    rows: list[dict[str, Any]] = []
    failures: list[ClassificationResult] = []
    for row in iter_inputs(sources, recursive=recursive):
        if row.error is not None:
            failures.append(ClassificationResult(input=row.input, model=model_name, error=row.error))
        else:
            rows.append({"input": row.input, "key": row.key, "path": row.path})
    return InputListing(rows, failures)
