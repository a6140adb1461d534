"""Classifying a dataset on a Ray cluster (the ``[ray]`` extra): Ray Data's batch-inference pattern, with
results equal to ``mixnet classify`` and a job that can be killed and resumed.

    import ray
    from mixnet_cli.distributed import MixnetPredictor, classify_dataset

    results = classify_dataset(["s3://bucket/photos/"], model="L")   # a ray.data.Dataset of result rows
    # or, with a Dataset of your own that has a "path" (and optionally a "bytes") column:
    results = my_dataset.map_batches(MixnetPredictor, fn_constructor_kwargs={"model": "L"},
                                     batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=4))

Each result row is the JSON object ``mixnet classify`` prints (:meth:`ClassificationResult.to_dict`) in the
Arrow schema :data:`RESULT_SCHEMA`: ``input``, ``model``, ``architecture``, ``predictions`` (a list of
{class_id, label, score}, null for a failed image) and ``error`` ({type, message}, null for a classified one).

The files are read inside the actors, in the classifier's decode threads, so a missing or unreadable file is an
error row like any bad image instead of a failed read task, and no read task competes with the actors for CPUs.
:func:`run_job` writes the rows from the driver into Parquet files, each written under a temporary name and
renamed when complete: a file in the output directory is a finished part, which is what makes ``--resume`` exact.

Ray and pyarrow are imported inside the functions that need them: ``mixnet --help`` and ``mixnet classify``
never import them, and a local run stays local.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from .base.errors import EngineError, ImageNotFoundError, ImageTooLargeError, ImageUnreadableError, MixnetError, UsageError
from .images.inputs import IMAGE_SUFFIXES, InputItem, display_name, expand_inputs, fetch_image_url, is_url
from .images.preprocess import MAX_IMAGE_BYTES

if TYPE_CHECKING:
    import pyarrow
    import pyarrow.fs
    import ray.data

    from .classifier import ClassificationResult

_log = logging.getLogger(__name__)

def _ray_missing_hint() -> str:
    from .base.third_party import install_hint

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
# Output part names: part-<run>-<sequence>.parquet (and .jsonl with JSON lines), <run> unique per run.
PART_PREFIX = "part-"
_BUCKET_SCHEMES = frozenset({"s3", "gs", "gcs", "abfs", "abfss"})


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
        import pyarrow.fs  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise EngineError(f"{_ray_missing_hint()} ({exc})") from None
    return pyarrow


def result_schema() -> "pyarrow.Schema":
    """The Arrow schema of a result row: the JSON object of ``mixnet classify``, with nulls for the part a row
    does not have. Scores are float64: the exact Python float the JSON output prints, bit for bit."""
    pa = _import_pyarrow()
    prediction = pa.struct([("class_id", pa.int64()), ("label", pa.string()), ("score", pa.float64())])
    error = pa.struct([("type", pa.string()), ("message", pa.string())])
    return pa.schema([
        pa.field("input", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("architecture", pa.string(), nullable=False),
        pa.field("predictions", pa.list_(prediction)),
        pa.field("error", error),
    ])


def result_row(result: "ClassificationResult") -> dict[str, Any]:
    """One result as a row of :func:`result_schema`: :meth:`ClassificationResult.to_dict` with both keys."""
    row = result.to_dict()
    return {"input": row["input"], "model": row["model"], "architecture": row["architecture"],
            "predictions": row.get("predictions"),
            "error": row.get("error")}


def results_table(rows: Sequence[Mapping[str, Any]]) -> "pyarrow.Table":
    return _import_pyarrow().Table.from_pylist(list(rows), schema=result_schema())


# --- where the images are ------------------------------------------------------------------------------------------


def is_uri(source: str) -> bool:
    """A path pyarrow opens through a filesystem of its own (``s3://``, ``gs://``, ``hdfs://``, ``file://``...);
    http(s) URLs are read as ``mixnet classify`` reads them."""
    return "://" in source and not is_url(source)


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _filesystem(uri: str) -> tuple["pyarrow.fs.FileSystem", str]:
    pa = _import_pyarrow()
    try:
        return pa.fs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise UsageError(f"{uri}: no filesystem pyarrow can open ({exc})") from None


def _list_uri(source: str, recursive: bool) -> list[str] | MixnetError:
    """The image files under a URI (by the suffixes of :data:`IMAGE_SUFFIXES`, sorted, hidden entries
    skipped, as :func:`~mixnet_cli.images.inputs.directory_images` does locally), or the error for the source itself."""
    pa = _import_pyarrow()
    filesystem, path = _filesystem(source)
    try:
        info = filesystem.get_file_info(path)
        if info.type == pa.fs.FileType.File:
            return [source]
        if info.type != pa.fs.FileType.Directory:
            return ImageNotFoundError(f"{source}: no such file or directory; check the path")
        entries = filesystem.get_file_info(pa.fs.FileSelector(path, recursive=recursive))
    except PermissionError:
        return ImageUnreadableError(f"{source}: permission denied; check the permissions")
    except OSError as exc:
        return ImageUnreadableError(f"{source}: cannot list ({exc}); check the path and credentials")
    base = path.rstrip("/")
    prefix = source.rstrip("/")
    found = []
    for entry in entries:
        relative = entry.path[len(base):].lstrip("/")
        if entry.type == pa.fs.FileType.File and not _hidden(relative) and \
                os.path.splitext(relative)[1].lower() in IMAGE_SUFFIXES:
            found.append(f"{prefix}/{relative}")
    if not found:
        return ImageNotFoundError(f"{source}: directory has no image files ({', '.join(sorted(IMAGE_SUFFIXES)[:6])}...)")
    return sorted(found)


@dataclass(frozen=True)
class InputListing:
    """What a job's sources name: ``rows`` to classify ({"input": display name, "path": bytes to open}) and the
    ``failures`` found while listing (a directory with no images, a glob that matches nothing, a broken link)."""

    rows: list[dict[str, Any]]
    failures: list["ClassificationResult"]


def list_inputs(sources: Iterable[str], model_name: str, *, recursive: bool = True) -> InputListing:
    """Expand ``sources`` as ``mixnet classify`` does (local files, directories, globs and http(s) URLs through
    :func:`~mixnet_cli.images.inputs.expand_inputs`, so names and filters are the same) plus pyarrow URIs (listed with
    the same extension filter). Local paths are carried as bytes (``os.fsencode``), so a name that is not UTF-8
    still opens."""
    from .classifier import ClassificationResult

    rows: list[dict[str, Any]] = []
    failures: list[ClassificationResult] = []
    local: list[str] = []

    def flush_local() -> None:
        for item in expand_inputs(local, recursive=recursive):
            if is_url(item.name):
                rows.append({"input": item.name, "path": item.name.encode()})
                continue
            try:
                target = item.load()  # for a local item: its Path, or the listing's error (no I/O)
            except MixnetError as exc:
                failures.append(ClassificationResult(input=item.name, model=model_name, error=exc))
                continue
            # Absolute: actors on a running cluster do not share this process's working directory.
            rows.append({"input": item.name, "path": os.fsencode(os.path.abspath(target))})
        local.clear()

    for source in sources:
        if source == "-":
            raise UsageError("classify-dataset reads files, not stdin: name files, directories or URIs")
        if not is_uri(source):
            local.append(source)
            continue
        flush_local()
        listed = _list_uri(source, recursive)
        if isinstance(listed, MixnetError):
            failures.append(ClassificationResult(input=source, model=model_name, error=listed))
        else:
            rows.extend({"input": uri, "path": uri.encode()} for uri in listed)
    flush_local()
    return InputListing(rows, failures)


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


def _column(batch: Any, name: str) -> list[Any] | None:
    """One column of a batch in any of Ray Data's formats (pyarrow.Table, pandas.DataFrame, dict of arrays)."""
    if hasattr(batch, "column_names"):  # pyarrow.Table
        return batch.column(name).to_pylist() if name in batch.column_names else None
    if hasattr(batch, "columns") and hasattr(batch, "to_dict"):  # pandas.DataFrame
        return list(batch[name]) if name in batch.columns else None
    return list(batch[name]) if name in batch else None


class MixnetPredictor:
    """A callable class for ``Dataset.map_batches``: each actor loads the model once, then classifies batches.

    A batch (``pyarrow.Table``, ``pandas.DataFrame`` or dict of arrays) has a ``path`` column (str or bytes: a
    local path, an ``s3://``-style URI pyarrow opens, or an http(s) URL) and optionally ``bytes`` (the encoded
    image, as ``ray.data.read_binary_files`` gives it; then ``path`` only names it) and ``input`` (the name
    written in the result; default: the path). It returns a ``pyarrow.Table`` of :func:`result_schema`, one row per
    input row, in order. It never raises for a bad image: a missing, unreadable or corrupt file, or an unexpected
    failure of one image, is an error row. ``threads`` defaults to the CPUs Ray assigned the actor.
    Other arguments are :class:`~mixnet_cli.classifier.Classifier`'s and :meth:`classify_many`'s.
    """

    def __init__(
        self,
        model: str = "MixNet_S",
        *,
        topk: int = 5,
        batch_size: int = 4,
        device: str = "cpu",
        engine: str = "auto",
        threads: int | None = None,
        mirrors: Sequence[str] | None = None,
        offline: bool | None = None,
    ) -> None:
        from .classifier import Classifier

        threads = threads or _actor_cpus()
        # Progress bars from many actors would interleave in the driver's log.
        self.classifier = Classifier(model, device=device, engine=engine, threads=threads, mirrors=mirrors,
                                     offline=offline, progress=False)
        self.topk = topk
        self.batch_size = batch_size
        self.workers = max(1, threads or 2)
        self._filesystems: dict[str, Any] = {}

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
        count = len(paths if paths is not None else data if data is not None else names or [])
        paths = paths if paths is not None else [None] * count
        data = data if data is not None else [None] * count
        if names is None:
            names = [display_name(p.decode("utf-8", "surrogateescape") if isinstance(p, bytes) else str(p))
                     for p in paths]
        items = [self._item(name, path, blob) for name, path, blob in zip(names, paths, data)]
        return results_table([result_row(result) for result in self._classify(items)])

    def _classify(self, items: list[InputItem]) -> list["ClassificationResult"]:
        try:
            return list(self.classifier.classify_many(items, topk=self.topk, batch_size=self.batch_size,
                                                      workers=self.workers))
        except Exception:  # noqa: BLE001 (a failure outside ImageError: find the image, keep the others)
            _log.warning("a batch failed as a whole; classifying its %d images one by one", len(items))
            return [self._classify_one(item) for item in items]

    def _classify_one(self, item: InputItem) -> "ClassificationResult":
        from .classifier import ClassificationResult

        try:
            return next(iter(self.classifier.classify_many([item], topk=self.topk, batch_size=1, workers=1)))
        except Exception as exc:  # noqa: BLE001 (never raise for one image: its row carries the error)
            error = MixnetError(f"{item.name}: unexpected {type(exc).__name__}: {exc}")
            return ClassificationResult(input=item.name, model=self.classifier.model_name, error=error)


# --- the cluster ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActorPlan:
    """How many actors, and what each asks of Ray: ``cpus`` (fractional), ``threads`` (engine threads)."""

    actors: int
    cpus: float
    threads: int


def plan_actors(node_cpus: Sequence[float], actors: int | None = None, cpus_per_actor: float | None = None) -> ActorPlan:
    """Size the actor pool from the CPUs of the cluster's nodes: by default one actor per node, asking for the
    node's CPUs less :data:`RESERVED_CPUS_PER_NODE`; with ``actors`` given, the cluster's CPUs (less the
    reserve) shared between them. One actor with 2 threads beat two with 1 thread each on a 2-CPU node, in time
    and memory. Raises :class:`UsageError` for a cluster with no CPUs or a non-positive count."""
    nodes = [cpus for cpus in node_cpus if cpus > 0]
    if not nodes:
        raise UsageError("the Ray cluster has no node with CPUs; start workers with `ray start --address ...`")
    if actors is not None and actors < 1:
        raise UsageError(f"--actors must be at least 1, got {actors}")
    if cpus_per_actor is not None and cpus_per_actor <= 0:
        raise UsageError(f"--cpus-per-actor must be above 0, got {cpus_per_actor:g}")
    count = actors or len(nodes)
    if cpus_per_actor is None:
        usable = sum(max(cpus - RESERVED_CPUS_PER_NODE, 0.25) for cpus in nodes)
        largest = max(nodes) - RESERVED_CPUS_PER_NODE
        # Quarters of a CPU: Ray schedules fractions, and an actor must fit on one node.
        cpus_per_actor = max(0.25, math.floor(min(usable / count, largest) * 4) / 4)
    return ActorPlan(actors=count, cpus=cpus_per_actor, threads=max(1, math.ceil(cpus_per_actor)))


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
    images_per_task: int = DEFAULT_IMAGES_PER_TASK,
    recursive: bool = True,
    skip_inputs: Iterable[str] = (),
) -> "ray.data.Dataset":
    """The lazy Dataset of result rows (:func:`result_schema`) for ``source``: a Ray ``Dataset`` with a ``path``
    column (and optionally ``bytes``, ``input``: see :class:`MixnetPredictor`), or paths / URIs listed as
    :func:`list_inputs` does, minus the inputs in ``skip_inputs``. Needs a Ray session (:func:`ray_session`).

    Safe defaults: an actor pool sized by :func:`plan_actors` (fractional CPUs, room left for Ray Data's
    tasks), actors restarted and their batch retried at most :data:`MAX_ACTOR_RESTARTS` times (then the job
    fails rather than looping or dropping images), ``images_per_task`` images per actor call. Rows come in no
    particular order. Raises :class:`UsageError` for bad arguments, :class:`EngineError` without the extra."""
    ray = _import_ray()
    from .base.manifest import resolve_model

    spec = resolve_model(model)
    if images_per_task < 1:
        raise UsageError(f"images per task must be at least 1, got {images_per_task}")
    if isinstance(source, str):
        source = [source]
    if isinstance(source, ray.data.Dataset):
        dataset = source
        failures: list[ClassificationResult] = []
    else:
        listing = list_inputs(source, spec.name, recursive=recursive)
        done = set(skip_inputs)
        rows = [row for row in listing.rows if row["input"] not in done]
        failures = [failure for failure in listing.failures if failure.input not in done]
        if not rows:  # nothing for the actors: do not start them
            return ray.data.from_arrow(results_table([result_row(failure) for failure in failures]))
        # One block per task's worth of rows at most, so that every actor gets work from the start.
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // images_per_task + 1, 10_000)))
    plan = plan_actors(_node_cpus(ray), actors, cpus_per_actor)
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_restarts / max_task_retries yet (it warns that the generic
        # remote arguments are deprecated); without them Ray Data restarts a crashing actor forever.
        warnings.simplefilter("ignore", DeprecationWarning)
        results = dataset.map_batches(
            MixnetPredictor,
            fn_constructor_kwargs={"model": spec.name, "topk": topk, "batch_size": batch_size, "device": device,
                                   "engine": engine, "threads": plan.threads, "mirrors": list(mirrors or []) or None,
                                   "offline": offline},
            batch_size=images_per_task,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.actors),
            num_cpus=plan.cpus,
            num_gpus=1 if device.startswith("gpu") else None,
            runtime_env={"env_vars": _forwarded_environment()},
            max_restarts=MAX_ACTOR_RESTARTS,
            max_task_retries=MAX_ACTOR_RESTARTS,
        )
    if failures:
        results = results.union(ray.data.from_arrow(results_table([result_row(f) for f in failures])))
    return results


# --- the output directory ------------------------------------------------------------------------------------------


@dataclass
class OutputState:
    """What an output directory already holds: ``inputs`` done (each once), how many of them ``failed``, and the
    ``models`` that classified them."""

    inputs: set[str] = field(default_factory=set)
    failed: int = 0
    models: set[str] = field(default_factory=set)


class ResultsDirectory:
    """An output directory of Parquet parts (and JSON lines parts with ``jsonl``), local or any pyarrow URI.

    Each part is written under a hidden temporary name and renamed when complete, so the parts present are the
    results finished; a JSON lines part is written before its Parquet twin, which marks it done.
    """

    def __init__(self, out: str, *, jsonl: bool = False) -> None:
        pa = _import_pyarrow()
        self.out = out
        self.jsonl = jsonl
        if is_uri(out):
            self.filesystem, self.root = _filesystem(out)
        else:
            self.filesystem, self.root = pa.fs.LocalFileSystem(), str(Path(out).expanduser().resolve())
        self.run = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
        self.sequence = 0

    def _entries(self) -> list[Any]:
        pa = _import_pyarrow()
        info = self.filesystem.get_file_info(self.root)
        if info.type == pa.fs.FileType.NotFound:
            return []
        if info.type != pa.fs.FileType.Directory:
            raise UsageError(f"-o {self.out}: exists and is not a directory; name a directory for the results")
        return self.filesystem.get_file_info(pa.fs.FileSelector(self.root, recursive=False))

    def prepare(self, resume: bool) -> OutputState:
        """Check the directory and read what it holds. Without ``resume`` it must be empty or absent (never
        appended to: a re-run would duplicate rows); with it, unfinished temporary files and JSON lines parts
        without their Parquet twin are removed, the inputs of every part are read, and JSON lines are written
        again if the directory has them (a resumed job keeps its formats). One job per directory at a time.
        Raises :class:`UsageError` for a non-empty directory without ``resume``, a file in its place or a
        directory that cannot be created; :class:`MixnetError` for a part that cannot be read."""
        pa = _import_pyarrow()
        entries = self._entries()
        if entries and not resume:
            raise UsageError(f"-o {self.out}: directory is not empty; add --resume to skip the images already in it, "
                             "or choose an empty directory")
        state = OutputState()
        names = {entry.base_name for entry in entries}
        for entry in entries:
            name = entry.base_name
            stale_jsonl = name.endswith(".jsonl") and name.startswith(PART_PREFIX) and \
                name[:-len(".jsonl")] + ".parquet" not in names
            if (name.startswith(".") and name.endswith(".tmp")) or stale_jsonl:
                self.filesystem.delete_file(entry.path)
            elif name.startswith(PART_PREFIX) and name.endswith(".jsonl"):
                self.jsonl = True
        if not entries:
            try:
                self.filesystem.create_dir(self.root, recursive=True)
            except OSError as exc:
                raise UsageError(f"-o {self.out}: cannot create the directory ({exc}); choose another") from None
        for entry in entries:
            if not (entry.base_name.startswith(PART_PREFIX) and entry.base_name.endswith(".parquet")):
                continue
            try:
                table = pa.parquet.read_table(entry.path, columns=["input", "model", "error"],
                                              filesystem=self.filesystem)
            except (pa.ArrowException, OSError) as exc:
                raise MixnetError(f"{entry.path}: cannot read this part of the results ({exc}); move it away and "
                                  "run with --resume again to redo its images") from None
            state.inputs.update(table.column("input").to_pylist())
            state.failed += table.num_rows - table.column("error").null_count
            state.models.update(table.column("model").unique().to_pylist())
        return state

    def write(self, table: "pyarrow.Table") -> None:
        """Write one part (Parquet, and JSON lines first when asked), each file in one rename."""
        pa = _import_pyarrow()
        self.sequence += 1
        stem = f"{PART_PREFIX}{self.run}-{self.sequence:06d}"
        if self.jsonl:
            text = "".join(json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n"
                           for row in table.to_pylist())
            self._atomic(f"{stem}.jsonl", lambda stream: stream.write(text.encode("utf-8")))
        self._atomic(f"{stem}.parquet", lambda stream: pa.parquet.write_table(table, stream))

    def _atomic(self, name: str, write: Callable[[Any], Any]) -> None:
        final = f"{self.root}/{name}"
        temporary = f"{self.root}/.{name}.{secrets.token_hex(4)}.tmp"
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


# --- a whole job ---------------------------------------------------------------------------------------------------


@dataclass
class JobSummary:
    """The counts of a job: ``images`` classified by this run, of which ``failed``; ``skipped`` already in the
    output (of which ``failed_before``); ``seconds`` of wall time from the first row asked for."""

    images: int = 0
    failed: int = 0
    skipped: int = 0
    failed_before: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def total_failed(self) -> int:
        return self.failed + self.failed_before

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "failed": self.failed, "skipped": self.skipped,
                "failed_before": self.failed_before, "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_s, 2)}


def run_job(
    sources: Sequence[str],
    out: str,
    model: str = "MixNet_S",
    *,
    resume: bool = False,
    jsonl: bool = False,
    address: str | None = None,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    on_error: Callable[[Mapping[str, Any]], None] | None = None,
    **options: Any,
) -> JobSummary:
    """Classify ``sources`` on Ray into the directory ``out`` (see :class:`ResultsDirectory`) and return the
    counts. ``resume`` skips the inputs already in ``out``; ``options`` go to :func:`classify_dataset`.
    ``on_error`` sees each error row as it arrives. The output is checked before Ray starts. Raises
    :class:`UsageError` (bad arguments, non-empty ``out`` without ``resume``, results of another model in it),
    :class:`MixnetError` (the job stopped: an actor crashed too often, the output could not be written; the parts
    written so far stay, for ``resume``)."""
    from .base.manifest import resolve_model

    spec = resolve_model(model)
    if rows_per_file < 1:
        raise UsageError(f"rows per file must be at least 1, got {rows_per_file}")
    if _starts_local_cluster(address):
        _loopback_environment()
    _import_ray()  # without the extra, say so before anything else
    directory = ResultsDirectory(out, jsonl=jsonl)
    state = directory.prepare(resume)
    if state.models - {spec.name}:
        other = sorted(state.models - {spec.name})[0]
        raise UsageError(f"-o {out}: holds results of {other}; resume with --model {other} or choose another "
                         "directory")
    summary = JobSummary(skipped=len(state.inputs), failed_before=state.failed)
    if _starts_local_cluster(address):
        # On this machine alone the driver's cache is the actors': get the weights here first, so that weights
        # that cannot be had are one line before Ray starts, not an actor that dies and restarts three times.
        from .weights.store import ensure_weights

        ensure_weights(spec, mirrors=options.get("mirrors"), offline=options.get("offline"))
    with ray_session(address) as ray:
        # Ray Data's default, said here because the job's exactness rests on it: a block that fails (after the
        # retries) fails the job; a positive value would drop whole batches of good images without a row.
        ray.data.DataContext.get_current().max_errored_blocks = 0
        results = classify_dataset(list(sources), spec.name, skip_inputs=state.inputs, **options)
        start = time.perf_counter()
        pending: list[Any] = []
        pending_rows = 0
        last_write = time.monotonic()

        def flush() -> None:
            nonlocal pending, pending_rows, last_write
            if pending_rows:
                pa = _import_pyarrow()
                directory.write(pa.concat_tables(pending))
            pending, pending_rows, last_write = [], 0, time.monotonic()

        try:
            for table in results.iter_batches(batch_size=None, batch_format="pyarrow"):
                if table.num_rows == 0:
                    continue
                table = table.cast(result_schema())
                errors = table.filter(table.column("error").is_valid())
                summary.images += table.num_rows
                summary.failed += errors.num_rows
                if on_error:
                    for row in errors.to_pylist():
                        on_error(row)
                pending.append(table)
                pending_rows += table.num_rows
                if pending_rows >= rows_per_file or time.monotonic() - last_write >= FLUSH_AFTER_S:
                    flush()
        except ray.exceptions.RayError as exc:
            flush()  # what finished is kept: --resume goes on from there
            last_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            raise MixnetError(f"the Ray job stopped after {summary.images} image(s) ({type(exc).__name__}: "
                              f"{last_line}); fix the cause and run again with --resume") from None
        flush()
        summary.seconds = time.perf_counter() - start
    return summary
