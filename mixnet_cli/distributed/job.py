"""Classifying a dataset on a Ray cluster (the ``[ray]`` extra), with results equal to ``mixnet classify``; a job
that streams its inputs, can be killed and resumed exactly, owns its output folder and stops early when every input
fails the same way. Also the same rows on Spark (:func:`spark_classify_batches`, for ``mapInArrow``).

    import ray
    from mixnet_cli.distributed import MixnetPredictor, classify_dataset, run_job

    summary = run_job(["s3://bucket/photos/"], "s3://bucket/results/", "L", address="auto", resume=True)
    results = classify_dataset(["s3://bucket/photos/"], model="L")   # a ray.data.Dataset of result rows
    # or, with a Dataset of your own that has a "path" (and optionally a "bytes") column:
    results = my_dataset.map_batches(MixnetPredictor, fn_constructor_kwargs={"model": "L"},
                                     batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=4))

Each result row is the JSON object ``mixnet classify`` prints (:meth:`ClassificationResult.to_dict`) plus the
input's canonical ``key``, in the Arrow schema :func:`result_schema`: ``input`` (as given), ``key`` (absolute,
normalised path, or the normalised URI: what resumption matches on), ``model``, ``architecture``, ``predictions`` (a list of {class_id,
label, score}, null for a failed image) and ``error`` ({type, message}, null for a classified one).

The files are read inside the actors, in the classifier's decode threads, so a missing or unreadable file is an
error row like any bad image. :func:`run_job` lists the inputs lazily (a directory level, a manifest batch at a
time), feeds an actor pool a few batches ahead of it, and writes the rows from the driver into Parquet files, each
written under a temporary name and renamed when complete: a file in the output directory is a finished part, which
is what makes ``--resume`` exact.

Ray and pyarrow are imported inside the functions that need them: ``mixnet --help`` and ``mixnet classify``
never import them, and a local run stays local.
"""

from __future__ import annotations

import datetime
import getpass
import glob
import hashlib
import json
import logging
import math
import os
import posixpath
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

from ..base.errors import EngineError, ImageNotFoundError, ImageTooLargeError, ImageUnreadableError, MixnetError, UsageError
from ..images.inputs import (
    IMAGE_SUFFIXES,
    InputItem,
    NoImagesError,
    display_name,
    expand_inputs,
    fetch_image_url,
    is_url,
)
from ..images.preprocess import MAX_IMAGE_BYTES

if TYPE_CHECKING:
    import numpy
    import pyarrow
    import pyarrow.fs
    import ray.data

    from ..classifier import ClassificationResult

_log = logging.getLogger(__name__)

def _ray_missing_hint() -> str:
    from ..base.third_party import install_hint

    return f"the Ray route needs the [ray] extra: {install_hint('ray')}"

# Images per call of an actor (one Ray task): big enough that the per-task overhead (milliseconds) is small
# against the work (about 64 x 25 ms on one core), small enough that a killed actor loses little and the driver
# sees progress often.
DEFAULT_IMAGES_PER_TASK = 64
# Rows per output file. A part is the unit of resumption: a job killed mid-way redoes at most this many images
# (per part not yet written), so smaller loses less work and makes more files.
DEFAULT_ROWS_PER_FILE = 10_000
# A part is also written when this many seconds have passed since the last one, so a slow job still saves work.
FLUSH_AFTER_S = 60.0
# CPUs each node keeps free of actors, for the small tasks Ray Data still runs (a Dataset you bring keeps its own
# read tasks): two actors asking for a whole CPU each on a 2-CPU node leave nothing for them, and the job hangs
# without a warning. Actors ask for fractional CPUs instead.
RESERVED_CPUS_PER_NODE = 0.5
# An actor that dies (a crash in a native library, a killed process) is restarted and its batch retried this many
# times; Ray's default for Ray Data is to restart forever, so one image that crashes the process would loop.
MAX_ACTOR_RESTARTS = 3
# Batches each actor of run_job has queued at once: one running and one waiting, so an actor never idles while
# the driver lists, and the driver holds no more than this many batches of inputs at a time.
TASKS_PER_ACTOR = 2
# A job whose first this-many inputs all fail with the same error stops (--fail-fast): missing credentials on the
# workers, a wrong prefix, a broken mount; each failure may take a network timeout of its own.
DEFAULT_FAIL_FAST = 50
# How often run_job reports progress (on_progress), in seconds.
PROGRESS_EVERY_S = 10.0
# Output part names: part-<run>-<sequence>.parquet, <run> unique per run; JSON lines parts (--jsonl) go to the
# sub-folder _jsonl/, which Parquet readers (pyarrow, pandas, Spark, DuckDB's globs) skip by its leading "_".
PART_PREFIX = "part-"
JSONL_FOLDER = "_jsonl"
# The job that owns an output folder: a lock file (local folders: an OS lock that dies with its process) and a
# record of the job (run id, host, pid, start, heartbeat) that a refused second job names. Both hidden names,
# which Parquet readers skip.
LOCK_NAME = ".mixnet-job.lock"
JOB_RECORD_NAME = ".mixnet-job.json"
# On object storage (no OS lock) the record is the lock: its holder rewrites it every HEARTBEAT_S seconds, and a
# record older than STALE_AFTER_S is taken over (its job is presumed dead).
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
# Key-value metadata of every Parquet part (provenance: which software, model, weights and settings made the rows).
METADATA_PREFIX = "mixnet."
_BUCKET_SCHEMES = frozenset({"s3", "gs", "gcs", "abfs", "abfss"})
_GLOB_CHARS = frozenset("*?[")
_MANIFEST_TABLE_SUFFIXES = (".parquet", ".pq", ".csv")


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 (fails beside numpy 1.x: pyarrow needs numpy 2)
    except ImportError as exc:
        raise EngineError(f"{_ray_missing_hint()} ({exc})") from None
    return ray


def _import_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.csv  # noqa: F401
        import pyarrow.fs  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise EngineError(f"{_ray_missing_hint()} ({exc})") from None
    return pyarrow


def result_schema() -> "pyarrow.Schema":
    """The Arrow schema of a result row: the JSON object of ``mixnet classify`` plus ``key`` (see
    :func:`canonical_key`), with nulls for the part a row does not have. Scores are float64: the exact Python float
    the JSON output prints, bit for bit."""
    pa = _import_pyarrow()
    prediction = pa.struct([("class_id", pa.int64()), ("label", pa.string()), ("score", pa.float64())])
    error = pa.struct([("type", pa.string()), ("message", pa.string())])
    return pa.schema([
        pa.field("input", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("architecture", pa.string(), nullable=False),
        pa.field("predictions", pa.list_(prediction)),
        pa.field("error", error),
    ])


# The same schema in Spark's DDL, for DataFrame.mapInArrow (pyspark is not imported for it).
SPARK_SCHEMA = ("input string, key string, model string, architecture string, "
                "predictions array<struct<class_id: bigint, label: string, score: double>>, "
                "error struct<type: string, message: string>")


def result_row(result: "ClassificationResult", key: str | None = None) -> dict[str, Any]:
    """One result as a row of :func:`result_schema`: :meth:`ClassificationResult.to_dict` with both optional
    keys, and ``key`` (default: :func:`canonical_key` of the input's name)."""
    row = result.to_dict()
    return {"input": row["input"], "key": key if key is not None else canonical_key(row["input"]),
            "model": row["model"], "architecture": row["architecture"], "predictions": row.get("predictions"),
            "error": row.get("error")}


def results_table(rows: Sequence[Mapping[str, Any]]) -> "pyarrow.Table":
    return _import_pyarrow().Table.from_pylist(list(rows), schema=result_schema())


# --- where the images are ------------------------------------------------------------------------------------------


def is_uri(source: str) -> bool:
    """A path pyarrow opens through a filesystem of its own (``s3://``, ``gs://``, ``hdfs://``, ``file://``...);
    http(s) URLs are read as ``mixnet classify`` reads them."""
    return "://" in source and not is_url(source)


def canonical_key(name: str) -> str:
    """The one spelling of an input that resumption matches on: a local path made absolute and normalised
    (``data/./a.jpg`` run from ``/srv`` and ``/srv/data/a.jpg`` are one key; symbolic links are not resolved, as
    that would cost a look at the disk per input); a ``file://`` URI as its local path; any other URI or URL as
    given, with the scheme (and an http host) in lower case, repeated slashes, ``.`` and ``..`` removed from its
    path. Not UTF-8 bytes of a file name are escaped as in :func:`~mixnet_cli.images.inputs.display_name`."""
    if "://" in name:
        parts = urlsplit(name)
        scheme = parts.scheme.lower()
        path = parts.path
        if path:
            trailing = "/" if path.endswith("/") and path.strip("/") else ""
            path = posixpath.normpath("/" + path.lstrip("/")) + trailing
            path = "" if path == "/" and not parts.path.startswith("/") else path
        if scheme == "file":
            return display_name(os.path.normpath(unquote(path or "/")))
        netloc = parts.netloc.lower() if scheme in ("http", "https") else parts.netloc
        return display_name(urlunsplit((scheme, netloc, path, parts.query, parts.fragment)))
    return display_name(os.path.normpath(os.path.abspath(os.path.expanduser(name))))


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


def _filesystem(uri: str) -> tuple["pyarrow.fs.FileSystem", str]:
    pa = _import_pyarrow()
    try:
        return pa.fs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise UsageError(f"{uri}: no filesystem pyarrow can open ({exc})") from None


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
        for match in glob.iglob(argument, recursive=True):
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


# --- what an output already holds ----------------------------------------------------------------------------------


def key_hash(key: str) -> int:
    """A 64-bit hash of a canonical key: what the done set of a resumed job holds (8 bytes per row). Two keys of
    one output sharing a hash (odds about n^2 / 2^65: 7e-5 for 50 million rows) would skip one input."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


class DoneSet:
    """The keys an output directory holds, as a sorted array of :func:`key_hash` values: 8 bytes per row (while
    the directory is read, twice that: the hashes of each batch, then the array they are joined into)."""

    def __init__(self, hashes: Iterable[int] = ()) -> None:
        import numpy as np

        self._hashes = np.sort(np.fromiter(hashes, dtype=np.uint64))

    @classmethod
    def from_array(cls, hashes: "numpy.ndarray") -> "DoneSet":
        """Takes ``hashes`` (uint64) and sorts it in place: no copy (``numpy.unique`` needed 6x the array's size
        at its peak); duplicates are harmless to the look-up."""
        import numpy as np

        done = cls()
        done._hashes = hashes.astype(np.uint64, copy=False)
        done._hashes.sort()
        return done

    def __len__(self) -> int:
        return int(self._hashes.size)

    @property
    def nbytes(self) -> int:
        return int(self._hashes.nbytes)

    def contains(self, keys: Sequence[str]) -> list[bool]:
        """For each key, whether it is done (one vectorised look-up for a batch)."""
        import numpy as np

        if not keys or not self._hashes.size:
            return [False] * len(keys)
        wanted = np.fromiter((key_hash(key) for key in keys), dtype=np.uint64, count=len(keys))
        at = np.searchsorted(self._hashes, wanted)
        at[at == self._hashes.size] = 0
        return (self._hashes[at] == wanted).tolist()


# --- the predictor -------------------------------------------------------------------------------------------------


def _actor_cpus() -> int | None:
    """The CPUs Ray gave this actor, rounded up (a fractional 1.5 runs 2 threads), or None outside Ray."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, math.ceil(cpus)) if cpus else None


def _ray_gpu_ids() -> list[str] | None:
    """The GPUs Ray assigned this process (its own ids), [] for none; None outside a Ray worker."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return [str(gpu) for gpu in ray.get_gpu_ids()]


def actor_device(device: str, gpu_ids: Sequence[str | int] | None, visible: str | None) -> str:
    """The device a predictor opens, under Ray's own GPU assignment.

    ``device`` as asked (``cpu``, ``gpu``, ``gpu:N``, ``auto``); ``gpu_ids`` the GPUs Ray assigned this actor
    (``ray.get_gpu_ids()``; None outside Ray); ``visible`` the ``CUDA_VISIBLE_DEVICES`` Ray left. Ray narrows
    ``CUDA_VISIBLE_DEVICES`` to the GPUs it assigns, so inside the actor the assigned GPU is number 0 whatever ``N``
    the user gave (``gpu:1`` would name a GPU the actor cannot see); where Ray leaves it alone
    (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``) the assigned id is used as it is. In Ray without a GPU
    assigned, ``auto`` is the CPU: a GPU Ray has not accounted for belongs to someone else."""
    if device == "cpu" or gpu_ids is None:
        return device
    if not gpu_ids:
        return "cpu" if device == "auto" else device
    assigned = str(gpu_ids[0])
    if visible is not None and visible.strip():
        numbers = [number.strip() for number in visible.split(",")]
        return f"gpu:{numbers.index(assigned)}" if assigned in numbers else "gpu:0"
    return f"gpu:{assigned}"


def _column(batch: Any, name: str) -> list[Any] | None:
    """One column of a batch in any of Ray Data's formats (pyarrow.Table, pandas.DataFrame, dict of arrays)."""
    if hasattr(batch, "column_names"):  # pyarrow.Table or RecordBatch
        return batch.column(name).to_pylist() if name in batch.column_names else None
    if hasattr(batch, "columns") and hasattr(batch, "to_dict"):  # pandas.DataFrame
        return list(batch[name]) if name in batch.columns else None
    return list(batch[name]) if name in batch else None


class MixnetPredictor:
    """A callable class for ``Dataset.map_batches`` (and the actors of :func:`run_job`, and Spark's
    ``mapInArrow`` through :func:`spark_classify_batches`): each loads the model once, then classifies batches.

    A batch (``pyarrow.Table``, ``pandas.DataFrame`` or dict of arrays) has a ``path`` column (str or bytes: a
    local path, an ``s3://``-style URI pyarrow opens, or an http(s) URL) and optionally ``bytes`` (the encoded
    image, as ``ray.data.read_binary_files`` gives it; then ``path`` only names it), ``input`` (the name
    written in the result; default: the path) and ``key`` (default: :func:`canonical_key` of the path). It returns
    a ``pyarrow.Table`` of :func:`result_schema`, one row per input row, in order. It never raises for a bad image:
    a missing, unreadable or corrupt file, or an unexpected failure of one image, is an error row. ``threads``
    defaults to the CPUs Ray assigned the actor; ``device`` is mapped onto the GPU Ray assigned
    (:func:`actor_device`). Other arguments are :class:`~mixnet_cli.classifier.Classifier`'s (``weights`` and
    ``labels``: your own files, at the same path on every node) and :meth:`classify_many`'s.
    """

    def __init__(
        self,
        model: str | None = "MixNet_S",
        *,
        topk: int = 5,
        batch_size: int = 4,
        device: str = "cpu",
        engine: str = "auto",
        threads: int | None = None,
        mirrors: Sequence[str] | None = None,
        offline: bool | None = None,
        weights: str | None = None,
        labels: str | None = None,
    ) -> None:
        from ..classifier import Classifier

        threads = threads or _actor_cpus()
        device = actor_device(device, _ray_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        # Progress bars from many actors would interleave in the driver's log.
        self.classifier = Classifier(model, device=device, engine=engine, threads=threads, mirrors=mirrors,
                                     offline=offline, progress=False, weights=weights, labels=labels)
        self.topk = topk
        self.batch_size = batch_size
        self.workers = max(1, threads or 2)
        self._filesystems: dict[str, Any] = {}

    def describe(self) -> dict[str, str]:
        """What made the rows, for the output files' metadata: model, weights sha256, engine, precision, device."""
        classifier = self.classifier
        return {"model": classifier.model_name, "weights_sha256": classifier.weights.record.sha256,
                "engine": classifier.engine.name, "precision": classifier.engine_choice.precision,
                "device": classifier.device_choice.device}

    def classify_batch(self, batch: Any) -> "pyarrow.Table":
        """``self(batch)``, under a name an actor method can have."""
        return self(batch)

    def _read_uri(self, uri: str, name: str) -> bytes:
        """The bytes of one file through pyarrow (its filesystem made once per bucket or host), with
        ``mixnet classify``'s size limit; errors as :class:`~mixnet_cli.base.errors.ImageError`."""
        parsed = urlparse(uri)
        key = f"{parsed.scheme}://{parsed.netloc}"
        # Object stores take "bucket/key"; filesystems with a host (hdfs://host:port/...) take the path alone.
        path = f"{parsed.netloc}{parsed.path}" if parsed.scheme in _BUCKET_SCHEMES else parsed.path
        try:
            if key not in self._filesystems:
                self._filesystems[key] = _filesystem(uri)[0]
            filesystem = self._filesystems[key]
            with filesystem.open_input_stream(path) as stream:
                data = stream.read(MAX_IMAGE_BYTES + 1)
        except FileNotFoundError:
            raise ImageNotFoundError(f"{name}: no such file; check the path") from None
        except PermissionError:
            raise ImageUnreadableError(f"{name}: permission denied; check the permissions") from None
        except (OSError, UsageError) as exc:
            raise ImageUnreadableError(f"{name}: cannot read ({exc}); check the path and credentials") from None
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageTooLargeError(f"{name}: more than {MAX_IMAGE_BYTES} bytes, over the limit for images")
        return data

    def _item(self, name: str, path: str | bytes | None, data: bytes | None) -> InputItem:
        if data is not None:
            return InputItem(name, lambda: data)
        if path is None:
            def no_path() -> bytes:
                raise ImageNotFoundError(f"{name}: the row has neither a path nor bytes")

            return InputItem(name, no_path)
        text = path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path
        if is_url(text):
            return InputItem(name, lambda: fetch_image_url(text))
        if is_uri(text):
            return InputItem(name, lambda: self._read_uri(text, name))
        local = Path(os.fsdecode(path) if isinstance(path, bytes) else path)
        return InputItem(name, lambda: local)

    def __call__(self, batch: Any) -> "pyarrow.Table":
        paths = _column(batch, "path")
        data = _column(batch, "bytes")
        names = _column(batch, "input")
        keys = _column(batch, "key")
        count = len(paths if paths is not None else data if data is not None else names or [])
        paths = paths if paths is not None else [None] * count
        data = data if data is not None else [None] * count
        texts = [p.decode("utf-8", "surrogateescape") if isinstance(p, bytes) else p for p in paths]
        if names is None:
            names = [display_name(str(text)) for text in texts]
        if keys is None:
            keys = [canonical_key(text if text is not None else name) for text, name in zip(texts, names)]
        items = [self._item(name, path, blob) for name, path, blob in zip(names, paths, data)]
        return results_table([result_row(result, key) for result, key in zip(self._classify(items), keys)])

    def _classify(self, items: list[InputItem]) -> list["ClassificationResult"]:
        try:
            return list(self.classifier.classify_many(items, topk=self.topk, batch_size=self.batch_size,
                                                      workers=self.workers))
        except Exception:  # noqa: BLE001 (a failure outside ImageError: find the image, keep the others)
            _log.warning("a batch failed as a whole; classifying its %d images one by one", len(items))
            return [self._classify_one(item) for item in items]

    def _classify_one(self, item: InputItem) -> "ClassificationResult":
        from ..classifier import ClassificationResult

        try:
            return next(iter(self.classifier.classify_many([item], topk=self.topk, batch_size=1, workers=1)))
        except Exception as exc:  # noqa: BLE001 (never raise for one image: its row carries the error)
            error = MixnetError(f"{item.name}: unexpected {type(exc).__name__}: {exc}")
            return ClassificationResult(input=item.name, model=self.classifier.model_name, error=error,
                                        architecture=self.classifier.architecture)


# --- the cluster ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActorPlan:
    """How many actors, and what each asks of Ray: ``cpus`` (fractional), ``threads`` (engine threads), ``gpus``
    (fractional; 0 for CPU actors, which then never touch a GPU: see :func:`actor_device`)."""

    actors: int
    cpus: float
    threads: int
    gpus: float = 0.0

    @property
    def device(self) -> str:
        """The device each actor is told to open."""
        return "gpu" if self.gpus else "cpu"


def plan_actors(
    node_cpus: Sequence[float],
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    *,
    cluster_gpus: float = 0.0,
    device: str = "cpu",
    gpus_per_actor: float | None = None,
) -> ActorPlan:
    """Size the actor pool from the cluster's resources, before any actor starts.

    On the CPU (``device`` ``cpu``, or ``auto`` on a cluster without GPUs): by default one actor per node, asking
    for the node's CPUs less :data:`RESERVED_CPUS_PER_NODE`; with ``actors`` given, the cluster's CPUs (less the
    reserve) shared between them. One actor with 2 threads beat two with 1 thread each on a 2-CPU node, in time
    and memory. On GPUs (``gpu``, ``gpu:N``, or ``auto`` on a cluster with ``cluster_gpus``): each actor asks Ray
    for ``gpus_per_actor`` GPUs (default 1; fractions share a GPU), and there is one actor per such share
    (``cluster_gpus / gpus_per_actor``, rounded down) unless ``actors`` says; CPUs are shared as above. Raises
    :class:`UsageError` for a cluster with no CPUs, ``gpu`` on a cluster without GPUs, ``gpus_per_actor`` above
    the cluster's GPUs or without GPUs asked for, and non-positive counts."""
    nodes = [cpus for cpus in node_cpus if cpus > 0]
    if not nodes:
        raise UsageError("the Ray cluster has no node with CPUs; start workers with `ray start --address ...`")
    if actors is not None and actors < 1:
        raise UsageError(f"--actors must be at least 1, got {actors}")
    if cpus_per_actor is not None and cpus_per_actor <= 0:
        raise UsageError(f"--cpus-per-actor must be above 0, got {cpus_per_actor:g}")
    if gpus_per_actor is not None and gpus_per_actor <= 0:
        raise UsageError(f"--gpus-per-actor must be above 0, got {gpus_per_actor:g}")
    wants_gpu = device.startswith("gpu")
    if wants_gpu and cluster_gpus <= 0:
        raise UsageError(f"--device {device}: the Ray cluster has no GPU (its nodes offer CPUs only); use --device "
                         "cpu, or add nodes with GPUs (`ray start --num-gpus N`)")
    uses_gpu = wants_gpu or (device == "auto" and cluster_gpus > 0)
    gpus = 0.0
    if uses_gpu:
        gpus = gpus_per_actor if gpus_per_actor is not None else 1.0
        if gpus > cluster_gpus:
            raise UsageError(f"--gpus-per-actor {gpus:g}: more than the cluster's {cluster_gpus:g} GPU(s); ask for "
                             "at most that many")
        count = actors or max(1, math.floor(cluster_gpus / gpus + 1e-9))
    else:
        if gpus_per_actor is not None:
            raise UsageError(f"--gpus-per-actor needs GPUs: add --device gpu (this job runs on the CPU: --device "
                             f"{device}{', and the cluster has no GPU' if device == 'auto' else ''})")
        count = actors or len(nodes)
    if cpus_per_actor is None:
        usable = sum(max(cpus - RESERVED_CPUS_PER_NODE, 0.25) for cpus in nodes)
        largest = max(nodes) - RESERVED_CPUS_PER_NODE
        # Quarters of a CPU: Ray schedules fractions, and an actor must fit on one node.
        cpus_per_actor = max(0.25, math.floor(min(usable / count, largest) * 4) / 4)
    return ActorPlan(actors=count, cpus=cpus_per_actor, threads=max(1, math.ceil(cpus_per_actor)), gpus=gpus)


def _cluster_gpus(ray: Any) -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def _node_cpus(ray: Any) -> list[float]:
    return [float(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]


def _starts_local_cluster(address: str | None) -> bool:
    return not (address or os.environ.get("RAY_ADDRESS"))


def _loopback_environment() -> None:
    """For a cluster that lives as long as this process: every socket on loopback, no usage reports (unless
    the user set these). Ray reads the first variable when it is imported, so this must run before (a program
    that imported ray already must set it itself); unset, Ray takes the routable address even for node
    127.0.0.1, and its servers listen on every interface."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's token authentication would write a new token to ~/.ray/auth_token, outside mixnet's cache; a token in
    # the environment serves this one cluster (its processes inherit it) and is written nowhere.
    if not any(os.environ.get(name) for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """Connected to Ray for the duration: an already initialised session as it is; ``address`` (``auto``,
    ``host:port``, ``ray://...``) or ``RAY_ADDRESS`` connects to a running cluster; with neither, a cluster of
    this machine alone is started on 127.0.0.1 (never the routable address, no dashboard, usage stats off
    unless set) and stopped at the end. Yields the ``ray`` module."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        _check_reachable(address)
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    session_files: str | None = None
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    if _starts_local_cluster(address):
        _loopback_environment()
        # The cluster's session files (logs, sockets, spilled objects) in a folder of its own, deleted with it:
        # Ray's default, /tmp/ray, keeps every session's. Short, under the system's temporary folder: Ray's
        # Unix socket paths inside it must stay under the OS's 107-character limit.
        session_files = tempfile.mkdtemp(prefix="mixnet-ray-")
        options.update(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
                       _temp_dir=session_files)
    try:
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if address is None:
                raise EngineError(f"cannot start Ray on this machine ({exc})") from None
            raise UsageError(f"--address {address}: cannot connect to a Ray cluster ({exc}); start one with "
                             "`ray start --head` or check the address") from None
        # Ray Data logs every execution plan at INFO on the driver's stderr; the command prints its own summary.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        try:
            yield ray
        finally:
            ray.shutdown()
    finally:
        if session_files is not None:
            shutil.rmtree(session_files, ignore_errors=True)


# How long a cluster's address may take to accept a connection before the command gives up on it.
CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str) -> None:
    """Fail in one line, within :data:`CONNECT_TIMEOUT_S`, when nothing accepts connections at ``address``
    (``host:port`` or ``ray://host:port``): ``ray.init`` itself keeps retrying such an address for minutes.
    ``auto`` is left to Ray, which finds the cluster of this machine or says there is none."""
    import socket

    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = target.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or type(exc).__name__).lower()
        raise UsageError(f"--address {address}: nothing answers there ({why}); start a cluster with "
                         "`ray start --head` or check the address") from None


def _forwarded_environment() -> dict[str, str]:
    """The driver's MIXNET_* settings, for the actors: on other nodes they would not be set otherwise."""
    return {name: value for name, value in os.environ.items() if name.startswith("MIXNET_")}


def classify_dataset(
    source: "ray.data.Dataset | Sequence[str] | str",
    model: str = "MixNet_S",
    *,
    topk: int = 5,
    batch_size: int = 4,
    device: str = "cpu",
    engine: str = "auto",
    mirrors: Sequence[str] | None = None,
    offline: bool | None = None,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float | None = None,
    images_per_task: int = DEFAULT_IMAGES_PER_TASK,
    recursive: bool = True,
    skip_keys: Iterable[str] = (),
    weights: str | None = None,
    labels: str | None = None,
) -> "ray.data.Dataset":
    """The lazy Dataset of result rows (:func:`result_schema`) for ``source``: a Ray ``Dataset`` with a ``path``
    column (and optionally ``bytes``, ``input``: see :class:`MixnetPredictor`), or paths / URIs listed as
    :func:`list_inputs` does, minus the inputs whose :func:`canonical_key` is in ``skip_keys``. Needs a Ray session (:func:`ray_session`).

    Safe defaults: an actor pool sized by :func:`plan_actors` (fractional CPUs, room left for Ray Data's
    tasks; GPUs as :func:`plan_actors` says for ``device``), actors restarted and their batch retried at most :data:`MAX_ACTOR_RESTARTS` times (then the job
    fails rather than looping or dropping images), ``images_per_task`` images per actor call. Rows come in no
    particular order. Raises :class:`UsageError` for bad arguments, :class:`EngineError` without the extra."""
    ray = _import_ray()
    spec = _job_model(model, weights)
    if images_per_task < 1:
        raise UsageError(f"images per task must be at least 1, got {images_per_task}")
    if isinstance(source, str):
        source = [source]
    if isinstance(source, ray.data.Dataset):
        dataset = source
        failures: list[ClassificationResult] = []
    else:
        listing = list_inputs(source, spec.name, recursive=recursive)
        done = set(skip_keys)
        rows = [row for row in listing.rows if row["key"] not in done]
        failures = [failure for failure in listing.failures if canonical_key(failure.input) not in done]
        if not rows:  # nothing for the actors: do not start them
            return ray.data.from_arrow(results_table([result_row(failure) for failure in failures]))
        # One block per task's worth of rows at most, so that every actor gets work from the start.
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // images_per_task + 1, 10_000)))
    plan = plan_actors(_node_cpus(ray), actors, cpus_per_actor, cluster_gpus=_cluster_gpus(ray), device=device,
                       gpus_per_actor=gpus_per_actor)
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_restarts / max_task_retries yet (it warns that the generic
        # remote arguments are deprecated); without them Ray Data restarts a crashing actor forever.
        warnings.simplefilter("ignore", DeprecationWarning)
        results = dataset.map_batches(
            MixnetPredictor,
            fn_constructor_kwargs={"model": model if weights else spec.name, "topk": topk, "batch_size": batch_size,
                                   "device": plan.device, "engine": engine, "threads": plan.threads,
                                   "mirrors": list(mirrors or []) or None, "offline": offline, "weights": weights,
                                   "labels": labels},
            batch_size=images_per_task,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.actors),
            num_cpus=plan.cpus,
            num_gpus=plan.gpus or None,
            runtime_env={"env_vars": _forwarded_environment()},
            max_restarts=MAX_ACTOR_RESTARTS,
            max_task_retries=MAX_ACTOR_RESTARTS,
        )
    if failures:
        results = results.union(ray.data.from_arrow(results_table([result_row(f) for f in failures])))
    return results


def _job_model(model: str | None, weights: str | Path | None) -> Any:
    """The ModelSpec a job classifies with: ``model``'s, or that read from your own ``weights`` (checked here,
    in the driver, before Ray starts). Raises :class:`UsageError` for an unknown model or a missing file."""
    from ..base.manifest import resolve_model

    if weights is None:
        return resolve_model(model or "MixNet_S")
    from ..weights.store import custom_weights

    return custom_weights(weights, resolve_model(model) if model else None).spec


# --- the output directory ------------------------------------------------------------------------------------------


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class JobLock:
    """The one job that may write into an output directory.

    A local directory: an OS lock on a hidden file in it (:func:`~mixnet_cli.base.locks.file_lock`, the cache's
    discipline: it dies with its process, even on SIGKILL, and its file goes with its holder), and a record beside it
    naming the job (run id, host, pid, start) for the job that is refused. A URI (object storage has no lock): the
    record is the lock; its holder rewrites it every ``heartbeat_s`` seconds from a thread, and a record whose
    heartbeat is older than ``stale_after_s`` is taken over, said in a warning. Two jobs starting within the same
    instant on object storage can both write their record; each reads it back and the one whose record is not there
    stops, so at most one goes on (the store's last write wins). Heartbeats are compared with this machine's clock.
    """

    def __init__(self, filesystem: Any, root: str, out: str, run: str, *, local: bool,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> None:
        self.filesystem = filesystem
        self.root = root
        self.out = out
        self.run = run
        self.local = local
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.record_path = f"{root}/{JOB_RECORD_NAME}"
        self.started_at = _now_iso()
        self.lost = False  # set by the heartbeat when another job took the record over
        self._lock: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"run": self.run, "host": socket.gethostname(), "pid": os.getpid(), "user": _user(),
                "started_at": self.started_at, "heartbeat": time.time()}

    def _read_record(self) -> dict[str, Any] | None:
        try:
            with self.filesystem.open_input_stream(self.record_path) as stream:
                return json.loads(stream.read().decode("utf-8"))
        except (FileNotFoundError, ValueError):
            return None
        except OSError as exc:
            if "not found" in str(exc).lower() or "no such" in str(exc).lower():
                return None
            raise

    def _write_record(self) -> None:
        data = json.dumps(self._record()).encode("utf-8")
        if self.local:  # a reader never sees half a record
            temporary = f"{self.root}/.{JOB_RECORD_NAME}.{secrets.token_hex(4)}.tmp"
            with self.filesystem.open_output_stream(temporary) as stream:
                stream.write(data)
            self.filesystem.move(temporary, self.record_path)
        else:  # an object is replaced whole
            with self.filesystem.open_output_stream(self.record_path) as stream:
                stream.write(data)

    def _refusal(self, holder: dict[str, Any] | None) -> UsageError:
        if holder:
            who = (f"run {holder.get('run', '?')}, pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
                   f"started {holder.get('started_at', '?')}")
        else:
            who = "a job that has not written its record yet"
        return UsageError(f"-o {self.out}: another classify-dataset job is writing there ({who}); wait for it to "
                          "finish, or choose another directory")

    def acquire(self) -> None:
        """Take the directory, or raise :class:`UsageError` naming the job that holds it."""
        if self.local:
            import filelock

            from ..base.locks import file_lock

            self._lock = file_lock(Path(self.root) / LOCK_NAME)
            try:
                self._lock.acquire(timeout=0)
            except filelock.Timeout:
                self._lock = None
                raise self._refusal(self._read_record()) from None
            self._write_record()
            return
        holder = self._read_record()
        if holder and holder.get("run") != self.run:
            age = time.time() - float(holder.get("heartbeat", 0))
            if age < self.stale_after_s:
                raise self._refusal(holder)
            _log.warning("-o %s: taking over from run %s, whose last heartbeat is %.0f s old", self.out,
                         holder.get("run"), age)
        self._write_record()
        time.sleep(min(1.0, self.heartbeat_s / 10))  # a job that wrote at the same instant has written by now
        holder = self._read_record()
        if not holder or holder.get("run") != self.run:
            raise self._refusal(holder)
        self._thread = threading.Thread(target=self._beat, name="mixnet-job-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self._read_record()
                if holder and holder.get("run") != self.run:
                    self.lost = True
                    return
                self._write_record()
            except OSError as exc:  # a passing storage error: the next beat tries again
                _log.warning("-o %s: cannot renew the job record (%s)", self.out, exc)

    def check(self) -> None:
        """Raise :class:`MixnetError` when another job has taken the directory over (object storage only)."""
        if self.lost:
            raise MixnetError(f"-o {self.out}: another job took this directory over (this job's heartbeat was "
                              "late); stopped, keeping the parts written")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            holder = self._read_record()
            if holder and holder.get("run") == self.run:
                self.filesystem.delete_file(self.record_path)
        except OSError:
            pass
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "?"


@dataclass
class OutputState:
    """What an output directory already holds: the ``done`` keys (:class:`DoneSet`), how many rows, of which
    ``failed``, and the ``models`` that classified them."""

    done: DoneSet = field(default_factory=DoneSet)
    rows: int = 0
    failed: int = 0
    models: set[str] = field(default_factory=set)


def _is_part(name: str, suffix: str) -> bool:
    return name.startswith(PART_PREFIX) and name.endswith(suffix)


class ResultsDirectory:
    """An output directory: one Parquet dataset (``part-*.parquet``, each with the job's provenance as key-value
    metadata) and, with ``jsonl``, the same parts as JSON lines in ``_jsonl/``; local or any pyarrow URI.

    Each part is written under a hidden temporary name and renamed when complete, so the parts present are the
    results finished; a JSON lines part is written before its Parquet twin, which marks it done. One job at a
    time (:class:`JobLock`).
    """

    def __init__(self, out: str, *, jsonl: bool = False, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        pa = _import_pyarrow()
        self.out = out
        self.jsonl = jsonl
        self.local = not is_uri(out)
        if self.local:
            self.filesystem, self.root = pa.fs.LocalFileSystem(), str(Path(out).expanduser().resolve())
        else:
            self.filesystem, self.root = _filesystem(out)
            self.root = self.root.rstrip("/")
        self.run = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
        self.sequence = 0
        self.metadata: dict[str, str] = {}
        self.lock = JobLock(self.filesystem, self.root, out, self.run, local=self.local, heartbeat_s=heartbeat_s,
                            stale_after_s=stale_after_s)

    def _entries(self, folder: str | None = None) -> list[Any]:
        pa = _import_pyarrow()
        folder = folder or self.root
        info = self.filesystem.get_file_info(folder)
        if info.type == pa.fs.FileType.NotFound:
            return []
        if info.type != pa.fs.FileType.Directory:
            raise UsageError(f"-o {self.out}: exists and is not a directory; name a directory for the results")
        return self.filesystem.get_file_info(pa.fs.FileSelector(folder, recursive=False))

    def open(self, resume: bool, retry_failed: bool = False) -> OutputState:
        """Take the directory (:class:`JobLock`; released by :meth:`close`), check it and read what it holds.

        Without ``resume`` it must be empty or absent (never appended to: a re-run would duplicate rows); with
        it, unfinished temporary files and JSON lines parts without their Parquet twin are removed, the keys of
        every part are read (the key column alone, into a :class:`DoneSet`), and JSON lines are written again if
        the directory has them (a resumed job keeps its formats). With ``retry_failed`` the error rows are first
        removed from the parts (each part rewritten in one rename), so their inputs are classified again and the
        directory ends with one row per input. Raises :class:`UsageError` for a non-empty directory without
        ``resume``, a directory another job holds, a file in its place or a directory that cannot be created;
        :class:`MixnetError` for a part that cannot be read."""
        entries = self._entries()
        if not entries:
            try:
                self.filesystem.create_dir(self.root, recursive=True)
            except OSError as exc:
                raise UsageError(f"-o {self.out}: cannot create the directory ({exc}); choose another") from None
        self.lock.acquire()
        try:
            return self._read_state(resume, retry_failed)
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        self.lock.release()

    def _read_state(self, resume: bool, retry_failed: bool) -> OutputState:
        pa = _import_pyarrow()
        # The lock and the job's record (and its temporary file) are this job's own, not results.
        entries = [entry for entry in self._entries() if not entry.base_name.startswith(".mixnet-job")]
        if entries and not resume:
            raise UsageError(f"-o {self.out}: directory is not empty; add --resume to skip the images already in it, "
                             "or choose an empty directory")
        jsonl_folder = f"{self.root}/{JSONL_FOLDER}"
        jsonl_entries = []
        for entry in entries:
            if entry.base_name == JSONL_FOLDER and entry.type == pa.fs.FileType.Directory:
                self.jsonl = True
                jsonl_entries = self._entries(jsonl_folder)
        parquet_names = {entry.base_name for entry in entries if _is_part(entry.base_name, ".parquet")}
        for entry in [*entries, *jsonl_entries]:
            name = entry.base_name
            stale_jsonl = _is_part(name, ".jsonl") and name[:-len(".jsonl")] + ".parquet" not in parquet_names
            if (name.startswith(".") and name.endswith(".tmp")) or stale_jsonl:
                self.filesystem.delete_file(entry.path)
        state = OutputState()
        import numpy as np

        hashes: list[Any] = []
        for entry in sorted(entries, key=lambda entry: entry.base_name):
            if not _is_part(entry.base_name, ".parquet"):
                continue
            try:
                if retry_failed:
                    self._drop_error_rows(entry.base_name)
                parquet = pa.parquet.ParquetFile(entry.path, filesystem=self.filesystem)
                names = parquet.schema_arrow.names
                key_column = "key" if "key" in names else "input"  # parts of earlier versions: no key column
                # The model and the failures from the file's metadata when it has them: only the keys are read.
                model = (parquet.schema_arrow.metadata or {}).get(f"{METADATA_PREFIX}model".encode())
                failed = _failed_from_statistics(parquet.metadata)
                extra = ([] if model else ["model"]) + ([] if failed is not None else ["error"])
                if model:
                    state.models.add(model.decode())
                if failed is not None:
                    state.failed += failed
                for batch in parquet.iter_batches(columns=[key_column, *extra], batch_size=65_536):
                    keys = batch.column(0).to_pylist()
                    if key_column == "input":
                        keys = [canonical_key(key) for key in keys]
                    hashes.append(np.fromiter((key_hash(key) for key in keys), dtype=np.uint64, count=len(keys)))
                    state.rows += batch.num_rows
                    if "error" in extra:
                        state.failed += batch.num_rows - batch.column(extra.index("error") + 1).null_count
                    if "model" in extra:
                        state.models.update(batch.column(extra.index("model") + 1).unique().to_pylist())
            except (pa.ArrowException, OSError) as exc:
                raise MixnetError(f"{entry.path}: cannot read this part of the results ({exc}); move it away and "
                                  "run with --resume again to redo its images") from None
        if hashes:
            joined = np.concatenate(hashes)
            hashes.clear()
            state.done = DoneSet.from_array(joined)
        return state

    def _drop_error_rows(self, name: str) -> None:
        """Rewrite one part without its error rows (JSON lines twin first), or delete it when nothing is left."""
        pa = _import_pyarrow()
        path = f"{self.root}/{name}"
        table = pa.parquet.read_table(path, filesystem=self.filesystem)
        if table.column("error").null_count == table.num_rows:
            return
        kept = table.filter(table.column("error").is_null())
        jsonl_name = f"{JSONL_FOLDER}/{name[:-len('.parquet')]}.jsonl"
        if kept.num_rows == 0:
            if self.jsonl:
                try:
                    self.filesystem.delete_file(f"{self.root}/{jsonl_name}")
                except (FileNotFoundError, OSError):
                    pass
            self.filesystem.delete_file(path)
            return
        if self.jsonl:
            self._atomic(jsonl_name, lambda stream: stream.write(_jsonl_text(kept)))
        self._atomic(name, lambda stream: pa.parquet.write_table(kept, stream))

    def write(self, table: "pyarrow.Table") -> None:
        """Write one part (Parquet with :attr:`metadata`, and JSON lines first when asked), each file in one
        rename."""
        pa = _import_pyarrow()
        self.lock.check()
        self.sequence += 1
        stem = f"{PART_PREFIX}{self.run}-{self.sequence:06d}"
        if self.jsonl:
            if self.sequence == 1:
                self.filesystem.create_dir(f"{self.root}/{JSONL_FOLDER}", recursive=True)
            self._atomic(f"{JSONL_FOLDER}/{stem}.jsonl", lambda stream: stream.write(_jsonl_text(table)))
        metadata = {f"{METADATA_PREFIX}{key}": value for key, value in self.metadata.items()}
        table = table.replace_schema_metadata(metadata)
        self._atomic(f"{stem}.parquet", lambda stream: pa.parquet.write_table(table, stream))

    def _atomic(self, name: str, write: Callable[[Any], Any]) -> None:
        final = f"{self.root}/{name}"
        folder, _, base = final.rpartition("/")
        temporary = f"{folder}/.{base}.{secrets.token_hex(4)}.tmp"
        try:
            with self.filesystem.open_output_stream(temporary) as stream:
                write(stream)
            self.filesystem.move(temporary, final)
        except BaseException:
            try:
                self.filesystem.delete_file(temporary)
            except OSError:
                pass
            raise


def _failed_from_statistics(metadata: Any) -> int | None:
    """The error rows of a Parquet file from its row groups' statistics (rows less the nulls of ``error.type``,
    which is null exactly where ``error`` is), or None when a row group has no null count."""
    schema = metadata.schema
    column = next((index for index in range(len(schema)) if schema.column(index).path == "error.type"), None)
    if column is None:
        return None
    failed = 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        statistics = row_group.column(column).statistics
        if statistics is None or not statistics.has_null_count:
            return None
        failed += row_group.num_rows - statistics.null_count
    return failed


def _jsonl_text(table: "pyarrow.Table") -> bytes:
    """The rows as ``mixnet classify --jsonl`` prints them (null fields left out; the key is kept)."""
    return "".join(json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n"
                   for row in table.to_pylist()).encode("utf-8")


# --- a whole job ---------------------------------------------------------------------------------------------------


@dataclass
class JobSummary:
    """The counts of a job: ``images`` classified by this run, of which ``failed``; ``skipped`` inputs already in
    the output; ``failed_before``: error rows the output held when the job started; ``seconds`` of wall time of the
    whole job (from the call, Ray's start included), of which ``startup_seconds`` before the first result came
    back (Ray, the actors, the model)."""

    images: int = 0
    failed: int = 0
    skipped: int = 0
    failed_before: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def total_failed(self) -> int:
        return self.failed + self.failed_before

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "failed": self.failed, "skipped": self.skipped,
                "failed_before": self.failed_before, "seconds": round(self.seconds, 3),
                "startup_seconds": round(self.startup_seconds, 3), "images_per_s": round(self.images_per_s, 2)}


@dataclass(frozen=True)
class JobProgress:
    """Where a running job stands: ``done`` rows this run (``failed`` of them), ``rows_per_s`` since the first
    result, ``eta_s`` (None until every input has been listed), ``skipped`` inputs already in the output."""

    done: int
    failed: int
    rows_per_s: float
    eta_s: float | None
    skipped: int


def job_progress(summary: JobSummary, elapsed_s: float, listed: int, listed_all: bool) -> JobProgress:
    """Where a job stands: ``summary``'s counts so far, ``elapsed_s`` since its first result, ``listed`` inputs
    handed out (or written as listing errors) so far, ``listed_all`` once the inputs are exhausted. The rate counts
    from the first result (the start-up is the summary's); the time left is known only once everything is listed."""
    rate = summary.images / elapsed_s if elapsed_s > 0 else 0.0
    eta = (listed - summary.images) / rate if listed_all and rate > 0 else None
    return JobProgress(done=summary.images, failed=summary.failed, rows_per_s=rate, eta_s=eta,
                       skipped=summary.skipped)


class _FailFast:
    """Whether the first ``limit`` rows of a job all failed with the same error (its type and its message with
    the input's name taken out); 0 turns it off. Once a row differs it stays quiet."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = limit > 0
        self.seen = 0
        self.signature: tuple[str, str] | None = None
        self.message = ""

    def add(self, rows: Iterable[tuple[str, Mapping[str, Any] | None]]) -> str | None:
        """The error's message when the limit is reached with these rows (``(input, error)`` pairs), else None."""
        for name, error in rows:
            if not self.active:
                return None
            if error is None:
                self.active = False
                return None
            signature = (str(error.get("type")), str(error.get("message", "")).replace(name, "<input>", 1))
            if self.signature is None:
                self.signature, self.message = signature, str(error.get("message", ""))
            elif signature != self.signature:
                self.active = False
                return None
            self.seen += 1
            if self.seen >= self.limit:
                self.active = False
                return self.message
        return None


def _batches(rows: Iterator[InputRow], size: int) -> Iterator[list[InputRow]]:
    while True:
        batch = [row for _, row in zip(range(size), rows)]
        if not batch:
            return
        yield batch


def run_job(
    sources: Sequence[str],
    out: str,
    model: str | None = "MixNet_S",
    *,
    resume: bool = False,
    retry_failed: bool = False,
    jsonl: bool = False,
    address: str | None = None,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    files_from: str | None = None,
    files_from_column: str | None = None,
    stdin: BinaryIO | None = None,
    fail_fast: int = DEFAULT_FAIL_FAST,
    on_error: Callable[[Mapping[str, Any]], None] | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
    progress_every_s: float = PROGRESS_EVERY_S,
    topk: int = 5,
    batch_size: int = 4,
    device: str = "cpu",
    engine: str = "auto",
    mirrors: Sequence[str] | None = None,
    offline: bool | None = None,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float | None = None,
    images_per_task: int = DEFAULT_IMAGES_PER_TASK,
    recursive: bool = True,
    weights: str | None = None,
    labels: str | None = None,
) -> JobSummary:
    """Classify ``sources`` (and the manifest ``files_from``: see :func:`iter_inputs`) on Ray into the directory
    ``out`` (see :class:`ResultsDirectory`) and return the counts.

    The inputs are streamed: listed a batch at a time while the actors classify the batches before, so the driver's
    memory does not grow with their number, and with ``resume`` each batch is checked against the keys already in
    ``out`` (:class:`DoneSet`: 8 bytes per row there). ``retry_failed`` (with ``resume``) classifies the inputs
    whose rows are errors again, replacing those rows. When the first ``fail_fast`` rows all fail with the same
    error the job stops (0: never). ``on_error`` sees each error row as it arrives, ``on_progress`` a
    :class:`JobProgress` every ``progress_every_s`` seconds. The output is checked and locked before Ray starts; on a
    cluster without GPUs ``device="gpu"`` fails before any actor starts. Other arguments are
    :class:`MixnetPredictor`'s and :func:`plan_actors`'. Raises :class:`UsageError` (bad arguments, non-empty ``out``
    without ``resume``, ``out`` held by another job, results of another model in it, no GPU), :class:`MixnetError`
    (the job stopped: the first inputs all failed the same way, an actor crashed too often, the output could not be
    written; the parts written so far stay, for ``resume``)."""
    started = time.perf_counter()
    started_at = _now_iso()
    if rows_per_file < 1:
        raise UsageError(f"rows per file must be at least 1, got {rows_per_file}")
    if images_per_task < 1:
        raise UsageError(f"images per task must be at least 1, got {images_per_task}")
    if retry_failed and not resume:
        raise UsageError("--retry-failed redoes the failed inputs of an earlier run: add --resume")
    if fail_fast < 0:
        raise UsageError(f"--fail-fast must be 0 (off) or more, got {fail_fast}")
    if labels is not None and not Path(labels).expanduser().is_file():
        raise UsageError(f"--labels {labels}: no such file")
    if weights is not None and not Path(weights).expanduser().is_file():
        raise UsageError(f"--weights {weights}: no such file")
    check_manifest(files_from, files_from_column)
    if "-" in sources:
        raise UsageError("classify-dataset reads files, not stdin: name files, directories or URIs (or a list of "
                         "them with --files-from -)")
    if files_from is None and not sources:
        raise UsageError("no inputs: name files, directories, globs or URIs, or a list of them with --files-from")
    spec = _job_model(model, weights)
    topk = min(topk, spec.num_classes)  # your own weights may have fewer classes
    local_cluster = _starts_local_cluster(address)
    if local_cluster:
        _loopback_environment()
    _import_ray()  # without the extra, say so before anything else
    directory = ResultsDirectory(out, jsonl=jsonl)
    state = directory.open(resume, retry_failed)
    try:
        if state.models - {spec.name}:
            other = sorted(state.models - {spec.name})[0]
            raise UsageError(f"-o {out}: holds results of {other}; resume with --model {other} or choose another "
                             "directory")
        if local_cluster and weights is None:
            # On this machine alone the driver's cache is the actors': get the weights here first, so that weights
            # that cannot be had are one line before Ray starts, not an actor that dies and restarts three times.
            from ..weights.store import ensure_weights

            ensure_weights(spec, mirrors=mirrors, offline=offline)
        summary = JobSummary(failed_before=state.failed)
        with ray_session(address) as ray:
            plan = plan_actors(_node_cpus(ray), actors, cpus_per_actor, cluster_gpus=_cluster_gpus(ray),
                               device=device, gpus_per_actor=gpus_per_actor)
            if device.startswith("gpu:"):
                _log.info("--device %s: on Ray each actor uses the GPU Ray assigns it", device)
            predictor = ray.remote(MixnetPredictor).options(
                num_cpus=plan.cpus, num_gpus=plan.gpus, max_restarts=MAX_ACTOR_RESTARTS,
                max_task_retries=MAX_ACTOR_RESTARTS, runtime_env={"env_vars": _forwarded_environment()})
            kwargs = {"model": model if weights else spec.name, "topk": topk, "batch_size": batch_size,
                      "device": plan.device, "engine": engine, "threads": plan.threads,
                      "mirrors": list(mirrors or []) or None, "offline": offline, "weights": weights,
                      "labels": labels}
            pool = [predictor.remote(**kwargs) for _ in range(plan.actors)]
            described = pool[0].describe.remote()
            # The actors belong to this driver: they end with its session (ray.shutdown), on any cluster; killing
            # them here first would only make Ray retry their queued calls and say so.
            _stream(ray, pool, described, directory, state, summary, started, started_at,
                    iter_inputs(sources, files_from=files_from, files_from_column=files_from_column,
                                recursive=recursive, stdin=stdin),
                    spec_name=spec.name, topk=topk, rows_per_file=rows_per_file, images_per_task=images_per_task,
                    fail_fast=fail_fast, on_error=on_error, on_progress=on_progress,
                    progress_every_s=progress_every_s)
    finally:
        directory.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _stream(ray: Any, pool: list[Any], described: Any, directory: ResultsDirectory, state: OutputState,
            summary: JobSummary, started: float, started_at: str, inputs: Iterator[InputRow], *, spec_name: str,
            topk: int, rows_per_file: int, images_per_task: int, fail_fast: int,
            on_error: Callable[[Mapping[str, Any]], None] | None, on_progress: Callable[[JobProgress], None] | None,
            progress_every_s: float) -> None:
    """The driver's loop of :func:`run_job`: list a batch, drop what is done, hand it to the least busy actor
    (at most :data:`TASKS_PER_ACTOR` batches each), collect results, write parts."""
    pa = _import_pyarrow()
    schema = result_schema()
    pending: list[Any] = []
    pending_rows = 0
    last_write = time.monotonic()
    in_flight: dict[Any, tuple[int, int]] = {}  # result ref -> (actor, rows)
    load = [0] * len(pool)
    batches = _batches(inputs, images_per_task)
    listed_all = False
    listed = 0
    first_result: float | None = None
    last_progress = time.monotonic()
    stop = _FailFast(fail_fast)

    def flush() -> None:
        nonlocal pending, pending_rows, last_write
        if pending_rows:
            if not directory.metadata:
                about = ray.get(described)
                directory.metadata = {
                    "version": _mixnet_version(), "model": about["model"], "weights_sha256": about["weights_sha256"],
                    "engine": about["engine"], "precision": about["precision"], "device": about["device"],
                    "topk": str(topk), "run_id": directory.run, "started_at": started_at}
            directory.write(pa.concat_tables(pending))
        pending, pending_rows, last_write = [], 0, time.monotonic()

    def take(table: Any) -> None:
        nonlocal pending_rows, first_result
        if first_result is None:
            first_result = time.perf_counter()
            summary.startup_seconds = first_result - started
        errors = table.filter(table.column("error").is_valid())
        summary.images += table.num_rows
        summary.failed += errors.num_rows
        if on_error:
            for row in errors.to_pylist():
                on_error(row)
        pending.append(table)
        pending_rows += table.num_rows
        if stop.active:
            message = stop.add(zip(table.column("input").to_pylist(), table.column("error").to_pylist()))
            if message is not None:
                flush()
                raise MixnetError(f"the first {stop.limit} inputs all failed the same way, so the job stopped: "
                                  f"{message} (fix the cause, then run again with --resume --retry-failed; "
                                  "--fail-fast 0 never stops)")
        if pending_rows >= rows_per_file or time.monotonic() - last_write >= FLUSH_AFTER_S:
            flush()

    def report() -> None:
        nonlocal last_progress
        if on_progress is None or time.monotonic() - last_progress < progress_every_s:
            return
        last_progress = time.monotonic()
        elapsed = time.perf_counter() - first_result if first_result is not None else 0.0
        on_progress(job_progress(summary, elapsed, listed, listed_all))

    try:
        while True:
            while not listed_all and len(in_flight) < TASKS_PER_ACTOR * len(pool):
                batch = next(batches, None)
                if batch is None:
                    listed_all = True
                    break
                done = state.done.contains([row.key for row in batch]) if len(state.done) else [False] * len(batch)
                todo = [row for row, skip in zip(batch, done) if not skip]
                summary.skipped += len(batch) - len(todo)
                listed += len(todo)
                failed = [row for row in todo if row.error is not None]
                if failed:
                    take(results_table([{"input": row.input, "key": row.key, "model": spec_name, "predictions": None,
                                         "error": {"type": type(row.error).__name__, "message": str(row.error)}}
                                        for row in failed]))
                work = [row for row in todo if row.error is None]
                if work:
                    actor = min(range(len(pool)), key=load.__getitem__)
                    ref = pool[actor].classify_batch.remote({"input": [row.input for row in work],
                                                             "key": [row.key for row in work],
                                                             "path": [row.path for row in work]})
                    in_flight[ref] = (actor, len(work))
                    load[actor] += 1
                report()
            if not in_flight:
                if listed_all:
                    break
                continue
            timeout = max(0.1, min(progress_every_s, FLUSH_AFTER_S - (time.monotonic() - last_write)))
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=timeout)
            for ref in ready:
                actor, _ = in_flight.pop(ref)
                load[actor] -= 1
                take(ray.get(ref).cast(schema))
            if not ready and pending_rows and time.monotonic() - last_write >= FLUSH_AFTER_S:
                flush()
            report()
    except ray.exceptions.RayError as exc:
        flush()  # what finished is kept: --resume goes on from there
        last_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
        raise MixnetError(f"the Ray job stopped after {summary.images} image(s) ({type(exc).__name__}: "
                          f"{last_line}); fix the cause and run again with --resume") from None
    except BaseException:
        if not isinstance(sys.exc_info()[1], MixnetError):
            try:
                flush()
            except Exception:  # noqa: BLE001 (the first error is the one to report)
                pass
        raise
    flush()


def _mixnet_version() -> str:
    from .. import __version__

    return __version__


# --- Spark ---------------------------------------------------------------------------------------------------------

# One predictor per Python worker process, by its settings: Spark reuses its Python workers between tasks
# (spark.python.worker.reuse, on by default), so the model loads once per worker, not once per partition.
_SPARK_PREDICTORS: dict[str, MixnetPredictor] = {}


def spark_classify_batches(model: str | None = "MixNet_S", **predictor_options: Any
                           ) -> Callable[[Iterator["pyarrow.RecordBatch"]], Iterator["pyarrow.RecordBatch"]]:
    """A function for Spark's ``DataFrame.mapInArrow(fn, SPARK_SCHEMA)``: it classifies each Arrow batch of a
    DataFrame with a ``path`` column (and optionally ``input``, ``key``, ``bytes``: see :class:`MixnetPredictor`)
    into rows of :func:`result_schema`, the same rows ``classify-dataset`` writes (one per input row, errors as
    rows, never raising for a bad image). ``predictor_options`` are :class:`MixnetPredictor`'s (``topk``,
    ``engine``, ``threads``: set it to the cores per Spark task, ``offline``...). Needs only pyarrow on the
    workers (and mixnet-cli), not Ray::

        from mixnet_cli.distributed import SPARK_SCHEMA, spark_classify_batches
        paths = spark.read.text("manifest.txt").withColumnRenamed("value", "path")
        paths.mapInArrow(spark_classify_batches("L", threads=2), SPARK_SCHEMA).write.parquet("results/")
    """
    settings = json.dumps({"model": model, **predictor_options}, sort_keys=True, default=str)

    def classify(batches: Iterator["pyarrow.RecordBatch"]) -> Iterator["pyarrow.RecordBatch"]:
        predictor = _SPARK_PREDICTORS.get(settings)
        if predictor is None:
            predictor = _SPARK_PREDICTORS[settings] = MixnetPredictor(model, **predictor_options)
        for batch in batches:
            if batch.num_rows:
                yield from predictor(batch).to_batches()

    return classify
