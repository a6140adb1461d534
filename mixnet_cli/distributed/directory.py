"""A job's output directory: Parquet parts (and their JSON lines twins), each written under a temporary name and
renamed when complete, with the job's provenance as metadata; and what a directory already holds (the done set
of keys, the rows, the failures, the models), which makes ``--resume`` exact."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from ..base.errors import MixnetError, UsageError
from .extra import _filesystem, _import_pyarrow
from .lock import HEARTBEAT_S, STALE_AFTER_S, JobLock
from .rows import canonical_key, is_uri

if TYPE_CHECKING:
    import numpy
    import pyarrow


# Output part names: part-<run>-<sequence>.parquet, <run> unique per run; JSON lines parts (--jsonl) go to the
# sub-folder _jsonl/, which Parquet readers (pyarrow, pandas, Spark, DuckDB's globs) skip by its leading "_".
PART_PREFIX = "part-"
JSONL_FOLDER = "_jsonl"
# Key-value metadata of every Parquet part (provenance: which software, model, weights and settings made the rows).
METADATA_PREFIX = "mixnet."


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
