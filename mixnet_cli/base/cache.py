"""The cache: every path under its root, the record kept beside each verified weights file, what the cache holds
(an inventory) and what deleting some of it means (a plan, then its execution).

Layout under the cache root (``MIXNET_HOME`` or the user cache directory)::

    weights/MixNet_S_pretrained.pdparams            the file exactly as downloaded, moved in only once verified
    weights/MixNet_S_pretrained.pdparams.json       its record: sha256, size, where it came from, when
    weights/MixNet_S_pretrained.pdparams.part       a download in progress (or interrupted: the next run resumes it)
    weights/MixNet_S_pretrained.pdparams.part.json  the URL and validator (ETag) that partial file came from
    weights/MixNet_S_pretrained.pdparams.lock       held by the one process downloading, installing or removing
                                                      that file; there only while held (or left by a killed one)
    weights/.MixNet_S_pretrained.pdparams.*.tmp     a file being copied in or a record being written
    onnx/<weights sha256>/                          converted models (mixnet_cli.engines.conversion), one folder per
    paddle-inference/<weights sha256>/                weights file, each with a record.json of its files
    paddle-legacy/<weights sha256>/
    openvino/<weights sha256>/                      OpenVINO's fixed-batch copies and compiled models
    paddle-home/, onnxruntime-home/                 what paddle and ONNX Runtime write to "home" while mixnet
                                                      runs them (mixnet_cli.base.third_party)

Nothing but the exact weights name is ever loaded as weights. Removing and clearing touch only these names (a
converted folder only when named by a sha256), so a cache root pointed at a directory that holds other files
never loses them.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import files, settings
from .errors import CacheError
from .manifest import ModelSpec, load_manifest

RECORD_SUFFIX = ".json"
PARTIAL_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"
# Converted models by kind -> their folder under the root; each holds one folder per weights sha256.
CONVERTED_FOLDERS = {"onnx": "onnx", "paddle": "paddle-inference", "paddle-legacy": "paddle-legacy",
                     "openvino": "openvino"}
# Engines' own "home" files while mixnet runs them -> their folder under the root.
ENGINE_HOMES = {"paddle": "paddle-home", "onnxruntime": "onnxruntime-home", "torch": "torch-compile"}
DIRECTORY_RECORD = "record.json"


def cache_root() -> Path:
    return settings.home()


def check_root() -> Path:
    """The cache directory, when it is one or is not there yet. Raises :class:`CacheError` when something else is
    (MIXNET_HOME naming a file): listing or clearing it would otherwise report an empty cache."""
    root = cache_root()
    if root.exists() and not root.is_dir():
        raise CacheError(f"the cache directory {root} is {files.kind_of_file(root)}, not a directory; set "
                         "MIXNET_HOME to a directory")
    return root


def weights_dir() -> Path:
    return cache_root() / "weights"


def converted_dir(kind: str, weights_sha256: str | None = None) -> Path:
    """The folder of ``kind``'s converted models (``onnx``, ``paddle``, ``paddle-legacy``, ``openvino``), or of
    those made from the weights with this sha256."""
    root = cache_root() / CONVERTED_FOLDERS[kind]
    return root if weights_sha256 is None else root / weights_sha256


def engine_home(engine: str) -> Path:
    """Where ``engine`` (``paddle``, ``onnxruntime``, ``torch``) keeps what it would write under the user's home or
    /tmp (torch: ``torch.compile``'s Inductor and Triton caches)."""
    return cache_root() / ENGINE_HOMES[engine]


def weights_path(spec: ModelSpec) -> Path:
    return weights_dir() / spec.filename


def record_path(spec: ModelSpec) -> Path:
    path = weights_path(spec)
    return path.with_name(path.name + RECORD_SUFFIX)


def partial_path(spec: ModelSpec) -> Path:
    """Where a download in progress accumulates; never loaded as weights."""
    path = weights_path(spec)
    return path.with_name(path.name + PARTIAL_SUFFIX)


# A partial download's record, beside it: the URL and the validator (strong ETag, else Last-Modified) of the
# response its bytes came from, so that the next run can ask for the rest (weights.download writes it; the
# inventory reads it to say what an interrupted download was).
INFO_SUFFIX = ".json"


def info_path(partial: Path) -> Path:
    """Where the URL and validator of ``partial``'s bytes are kept."""
    return partial.with_name(partial.name + INFO_SUFFIX)


def discard_partial(partial: Path) -> None:
    """Remove a partial file and its info (missing ones are fine)."""
    partial.unlink(missing_ok=True)
    info_path(partial).unlink(missing_ok=True)


@dataclass(frozen=True)
class PartialInfo:
    """The URL, validators and full size of the response a partial file's bytes came from."""

    url: str
    etag: str | None
    last_modified: str | None
    total: int | None

    @property
    def validator(self) -> str | None:
        return self.etag or self.last_modified


def read_partial_info(partial: Path) -> PartialInfo | None:
    """Where ``partial``'s bytes came from, or None when that is not known (then they are not resumed)."""
    try:
        raw = json.loads(info_path(partial).read_text(encoding="utf-8"))
        total = raw.get("total")
        return PartialInfo(
            url=str(raw["url"]),
            etag=raw.get("etag") or None,
            last_modified=raw.get("last_modified") or None,
            total=int(total) if total is not None else None,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_partial_info(partial: Path, info: PartialInfo) -> None:
    files.write_text(
        info_path(partial),
        json.dumps({"url": info.url, "etag": info.etag, "last_modified": info.last_modified, "total": info.total})
        + "\n",
    )


def lock_path(spec: ModelSpec) -> Path:
    path = weights_path(spec)
    return path.with_name(path.name + LOCK_SUFFIX)


def temporary_path(spec: ModelSpec, what: str = "") -> Path:
    """A fresh name beside the weights, unique to this process, thread and call, for a file written then renamed."""
    return files.temporary_path(weights_path(spec), what)


def leftover_paths(spec: ModelSpec) -> list[Path]:
    """Temporary files of processes that were killed (``.incomplete``: the name older versions used)."""
    directory = weights_dir()
    if not directory.is_dir():
        return []
    name = spec.filename
    found = list(directory.glob(f".{name}.*.tmp")) + list(directory.glob(f".{name}.*.incomplete"))
    return sorted(p for p in found if p.is_file())


@dataclass(frozen=True)
class WeightsRecord:
    """What was verified about a cached weights file when it entered the cache."""

    model: str
    sha256: str
    size: int
    source: str
    fetched_at: str
    # The file's stat when it was last hashed (files.stat_stamp): while it still matches, using the file skips
    # the hash (MIXNET_VERIFY=always hashes every time). None in records of older versions: hashed, then stamped.
    stat: dict[str, int] | None = None


def read_record(spec: ModelSpec) -> WeightsRecord | None:
    """The record of a cached file, or None when there is none or it is unreadable (treated as not cached)."""
    try:
        raw = json.loads(record_path(spec).read_text(encoding="utf-8"))
        return WeightsRecord(
            model=str(raw["model"]),
            sha256=str(raw["sha256"]),
            size=int(raw["size"]),
            source=str(raw["source"]),
            fetched_at=str(raw["fetched_at"]),
            stat=raw.get("stat") if isinstance(raw.get("stat"), dict) else None,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_record(spec: ModelSpec, record: WeightsRecord) -> None:
    """Write the record atomically (temporary file, then rename) so a reader never sees half of one."""
    files.write_text(record_path(spec), json.dumps(asdict(record), indent=2) + "\n")


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(
            f"cannot create the cache directory {path} ({exc.strerror}); "
            "set MIXNET_HOME to a writable directory"
        ) from None
    return path


sha256_of = files.file_sha256


# --- the lock ----------------------------------------------------------------------------------------------------

@contextmanager
def model_lock(spec: ModelSpec, *, wait: bool = True, on_wait: Any = None) -> Iterator[None]:
    """Hold the lock of ``spec``'s weights file: one process at a time downloads, installs or removes it.

    With ``wait=False`` a lock held elsewhere raises :class:`CacheError` at once; otherwise ``on_wait(path)`` is
    called, then this blocks until it is free. A cache that cannot be written raises :class:`CacheError`. The lock
    file is deleted when the holder lets go, after a success or a failure (:mod:`mixnet_cli.base.locks`); the OS drops
    the lock of a process that dies, so a killed run leaves at most an unheld file, which the next holder deletes.
    """
    from filelock import Timeout

    from .locks import file_lock

    path = lock_path(spec)
    lock = file_lock(path)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                raise CacheError(
                    f"another mixnet process is downloading {spec.filename} (lock {path}); "
                    "try again when it has finished"
                ) from None
            if on_wait is not None:
                on_wait(path)
            lock.acquire(timeout=-1)
    except CacheError:
        raise
    except OSError as exc:
        raise CacheError(
            f"cannot lock {path} ({exc.strerror or exc}); the cache is read-only: "
            "set MIXNET_HOME to a writable directory"
        ) from None
    try:
        yield
    finally:
        lock.release()


# --- what the cache holds ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheItem:
    """One row of ``mixnet cache list``: a weights file (or partial download), or a folder of converted models."""

    model: str | None
    kind: str  # weights, onnx, paddle-inference, paddle-legacy, openvino
    # verified (matches its record), unverified (no record yet: checked in full on first use), corrupt (no longer
    # matches its record), partial (an interrupted download the next run resumes); n/a for OpenVINO's own caches
    status: str
    size: int
    sha256: str | None
    source: str | None
    fetched_at: str | None
    path: Path
    # The network (MixNet_S...): ``model`` itself for released weights; for a model converted from a fine-tune,
    # ``model`` is the fine-tune's name (my_flowers-3fa2c1d) and this its architecture.
    architecture: str | None = None

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["path"] = str(self.path)
        return {"model": row.pop("model"), "architecture": row.pop("architecture") or self.model, **row}


def _mtime_iso(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).replace(microsecond=0).isoformat()


def list_entries(specs: Sequence[ModelSpec] | None = None) -> list[CacheItem]:
    """The weights files (and partial downloads) in the cache, each checked against its record."""

    entries: list[CacheItem] = []
    for spec in specs if specs is not None else load_manifest().models.values():
        path = weights_path(spec)
        try:
            if path.is_file():
                size = path.stat().st_size
                sha256 = sha256_of(path)
                record = read_record(spec)
                if record is None:
                    status, source, when = "unverified", None, _mtime_iso(path)
                else:
                    status = "verified" if (record.size, record.sha256) == (size, sha256) else "corrupt"
                    source, when = record.source, record.fetched_at
                entries.append(CacheItem(spec.name, "weights", status, size, sha256, source, when, path))
            partial = partial_path(spec)
            if partial.is_file():
                info = read_partial_info(partial)
                entries.append(CacheItem(
                    spec.name, "weights", "partial", partial.stat().st_size, None, info.url if info else None,
                    _mtime_iso(partial), partial,
                ))
        except OSError as exc:
            raise CacheError(f"cannot read {path} ({exc.strerror or exc}); check the cache's permissions") from None
    return entries


def model_files(spec: ModelSpec) -> list[Path]:
    """Every file the cache keeps for ``spec`` (not its lock), present ones only."""

    partial = partial_path(spec)
    named = [weights_path(spec), record_path(spec), partial, info_path(partial)]
    return [p for p in named if p.is_file()] + leftover_paths(spec)


def _remove(paths: Sequence[Path]) -> list[Path]:
    removed = []
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CacheError(
                f"cannot delete {path} ({exc.strerror or exc}); check the cache's permissions"
            ) from None
        removed.append(path)
    return removed


# --- converted folders: their records ------------------------------------------------------------------------------

def read_directory_record(directory: Path, name: str = DIRECTORY_RECORD) -> dict[str, Any] | None:
    """A folder's JSON record (a dict), or None when it is missing or unreadable."""
    try:
        raw = json.loads((directory / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def file_entry(path: Path) -> dict[str, Any]:
    """A record's entry for the file at ``path``: its size, sha256 and stat (stamped before the hash, so that a
    change during the hash shows as a changed stat). Raises ``OSError``."""
    stamp = files.stat_stamp(path)
    return {"size": stamp["size"], "sha256": sha256_of(path), "stat": stamp}


@dataclass(frozen=True)
class DirectoryCheck:
    """What checking a folder's files against its record found: ``problem`` (None: they match) and, for files
    hashed because their stat no longer vouched for them, their new stamps (name -> :func:`files.stat_stamp`)."""

    problem: str | None
    new_stamps: dict[str, dict[str, int]]


def check_directory(directory: Path, record: dict[str, Any] | None, *, full: bool = True) -> DirectoryCheck:
    """Check the files of ``directory`` against its record's ``files`` (name -> size, sha256 and stat). ``full``
    hashes every file; otherwise a file whose stat still matches the one recorded is taken as checked
    (:func:`files.stamp_vouches`)."""
    if record is None:
        return DirectoryCheck("has no readable record", {})
    listed = record.get("files")
    if not isinstance(listed, dict) or not listed:
        return DirectoryCheck("has a record that lists no files", {})
    new_stamps = {}
    for name, expected in listed.items():
        path = directory / name
        if Path(name).name != name or not isinstance(expected, dict):
            return DirectoryCheck("has a malformed record", {})
        if not full and files.stamp_vouches(path, expected.get("stat")) and expected["stat"]["size"] == expected.get("size"):
            continue
        try:
            stamp = files.stat_stamp(path)
        except OSError:
            return DirectoryCheck(f"is missing {name}", {})
        if stamp["size"] != expected.get("size") or sha256_of(path) != expected.get("sha256"):
            return DirectoryCheck(f"has a corrupt {name} (its sha256 does not match the record)", {})
        new_stamps[name] = stamp
    return DirectoryCheck(None, new_stamps)


def restamped(record: dict[str, Any], new_stamps: dict[str, dict[str, int]]) -> dict[str, Any]:
    """``record`` with the stats of :attr:`DirectoryCheck.new_stamps` in its files' entries (to write back)."""
    return {**record, "files": {name: {**entry, "stat": new_stamps.get(name, entry.get("stat"))}
                                for name, entry in record["files"].items()}}


def directory_problem(directory: Path, record: dict[str, Any] | None) -> str | None:
    """Why the files of ``directory`` do not match its record's ``files`` (name -> size and sha256), or None;
    every file hashed in full (what ``mixnet cache list`` shows)."""
    return check_directory(directory, record).problem


def _is_sha256(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- the inventory ---------------------------------------------------------------------------------------------------

def converted_items() -> list[CacheItem]:
    """Every folder of converted models, with the model it was made for, its size and whether its files still
    match its record (OpenVINO's folders hold its own caches: no record, status ``n/a``)."""
    items = []
    for kind, folder in CONVERTED_FOLDERS.items():
        root = cache_root() / folder
        if not root.is_dir():
            continue
        for directory in sorted(p for p in root.iterdir() if p.is_dir() and _is_sha256(p.name)):
            record = read_directory_record(directory)
            architecture = record.get("model") if record else None
            model = (record.get("weights_name") or architecture) if record else None
            status = "n/a"
            if kind != "openvino":
                status = "verified" if directory_problem(directory, record) is None else "corrupt"
            items.append(CacheItem(model if isinstance(model, str) else None, folder, status, _tree_size(directory),
                                   None, f"converted from weights {directory.name[:12]}", None, directory,
                                   architecture if isinstance(architecture, str) else None))
    return items


def inventory() -> list[CacheItem]:
    """Everything the cache holds for people to see: weights files (each checked against its record), partial
    downloads, and converted models (named by the model of the weights they were made from). Raises
    :class:`CacheError` when the cache directory is a file (:func:`check_root`)."""
    check_root()
    rows = list_entries()
    model_of = {row.sha256: (row.model, row.architecture) for row in rows if row.sha256}
    converted = converted_items()
    # OpenVINO's folders keep no record: their model is that of the weights they are named by, or, for weights
    # not in the cache (your own, --weights), the one the record of a folder converted from the same weights names.
    for item in converted:
        if item.model:
            model_of.setdefault(item.path.name, (item.model, item.architecture))
    for item in converted:
        model, architecture = model_of.get(item.path.name, (None, None))
        rows.append(item if item.model else replace(item, model=model, architecture=architecture))
    return rows


# --- deleting: a plan, then its execution --------------------------------------------------------------------------

@dataclass(frozen=True)
class DeletionPlan:
    """What a removal will delete: each model's weights files (deleted under that model's lock), lock files,
    converted folders, and engine homes; with the total size in bytes. Lock files are never weights files."""

    weights: dict[str, list[Path]]  # model name -> its files
    # model name -> its lock file: one a killed process left (a held lock makes the removal fail instead)
    locks: dict[str, Path]
    folders: list[Path]
    size: int

    @property
    def weights_files(self) -> int:
        return sum(len(paths) for paths in self.weights.values())

    def __bool__(self) -> bool:
        return bool(self.weights_files or self.locks or self.folders)


def _converted_folders_of(hashes: set[str] | None) -> list[Path]:
    """Converted folders (and leftovers of unfinished conversions) made from these weights (all when None)."""
    found = []
    for folder in CONVERTED_FOLDERS.values():
        root = cache_root() / folder
        if not root.is_dir():
            continue
        for path in sorted(root.iterdir()):
            name = path.name.lstrip(".").split(".", 1)[0]
            if not _is_sha256(name):
                continue  # not named by a weights sha256: not ours, leave it
            if hashes is None or name in hashes:
                found.append(path)
    return found


def plan_removal(specs: Sequence[ModelSpec]) -> DeletionPlan:
    """Deleting these models: their weights files, records, partial downloads, leftovers, a lock file a killed
    process left, and every folder converted from their weights (those recorded as made for the model, and the
    current weights'). Raises :class:`CacheError` when the cache directory is a file (:func:`check_root`)."""
    check_root()
    weights = {spec.name: model_files(spec) for spec in specs}
    names = {spec.name for spec in specs}
    # The model a folder was made for is in its record: no need to hash its files as a listing does.
    hashes = {directory.name for directory in _converted_folders_of(None)
              if directory.is_dir() and (read_directory_record(directory) or {}).get("model") in names}
    for spec in specs:
        record = read_record(spec)
        if record is not None:
            hashes.add(record.sha256)
    folders = _converted_folders_of(hashes)
    size = sum(_tree_size(p) for paths in weights.values() for p in paths) + sum(_tree_size(p) for p in folders)
    return DeletionPlan({k: v for k, v in weights.items() if v}, _lock_files(specs), folders, size)


def _lock_files(specs: Sequence[ModelSpec]) -> dict[str, Path]:
    return {spec.name: lock_path(spec) for spec in specs if lock_path(spec).is_file()}


def plan_clear() -> DeletionPlan:
    """Deleting everything the cache owns: every model's files and lock, every converted folder, the engine
    homes. Files of other names, and the cache root itself, are never touched. Raises :class:`CacheError` when
    the cache directory is a file (:func:`check_root`)."""
    check_root()
    specs = list(load_manifest().models.values())
    weights = {spec.name: model_files(spec) for spec in specs} if weights_dir().is_dir() else {}
    locks = _lock_files(specs)
    folders = _converted_folders_of(None) + [path for name in ENGINE_HOMES if (path := engine_home(name)).is_dir()]
    size = sum(_tree_size(p) for paths in weights.values() for p in paths) + sum(_tree_size(p) for p in folders)
    return DeletionPlan({k: v for k, v in weights.items() if v}, locks, folders, size)


def _let_go_of_unheld(path: Path) -> bool:
    """Take the lock file at ``path`` if nobody holds it, and let go (which deletes it); whether it is gone."""
    from filelock import Timeout

    from .locks import file_lock

    lock = file_lock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    except OSError as exc:
        raise CacheError(f"cannot delete {path} ({exc.strerror or exc}); check the cache's permissions") from None
    lock.release()
    return not path.exists()


def execute(plan: DeletionPlan) -> list[Path]:
    """Carry out ``plan``; returns what was deleted. A model's files are deleted under its lock: another process
    downloading it makes this raise :class:`CacheError` (its files stay). Emptied folders of the layout go too."""
    import shutil

    from .manifest import resolve_model

    removed: list[Path] = []
    for name in {**plan.weights, **plan.locks}:
        with model_lock(resolve_model(name), wait=False):
            removed += _remove(plan.weights.get(name, []))
        # Letting go of the lock deleted its file, a killed process's too; never deleted by name, which could
        # split a process that waits on it from one that comes later (mixnet_cli.base.locks).
        if name in plan.locks and not plan.locks[name].exists():
            removed.append(plan.locks[name])
    for path in plan.folders:
        if path.name.endswith(LOCK_SUFFIX):
            # A conversion's lock: deleted by taking it and letting go, as the model's; one held now is left to
            # its holder, which deletes it when done.
            if _let_go_of_unheld(path):
                removed.append(path)
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    for root in [weights_dir()] + [cache_root() / folder for folder in CONVERTED_FOLDERS.values()]:
        try:
            root.rmdir()
        except OSError:
            pass  # not empty (other files), or absent: leave it
    return removed
