"""A job on Ray: :func:`run_job`, the whole ``classify-dataset`` command as a function (inputs streamed to an
actor pool, rows written into parts of an output directory it locks, resumable, stopped early when every input
fails the same way, progress reported), and :func:`classify_dataset`, the lazy Ray ``Dataset`` of result rows
for a pipeline of your own."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence

from ..base.errors import MixnetError, UsageError
from .cluster import (
    MAX_ACTOR_RESTARTS,
    _cluster_gpus,
    _forwarded_environment,
    _loopback_environment,
    _node_cpus,
    _starts_local_cluster,
    plan_actors,
    ray_session,
)
from .directory import OutputState, ResultsDirectory
from .extra import _import_pyarrow, _import_ray
from .listing import InputRow, check_manifest, iter_inputs, list_inputs
from .lock import _now_iso
from .predictor import MixnetPredictor
from .rows import canonical_key, result_row, result_schema, results_table

if TYPE_CHECKING:
    import ray.data

    from ..classifier import ClassificationResult

_log = logging.getLogger(__name__)


# Images per call of an actor (one Ray task): big enough that the per-task overhead (milliseconds) is small
# against the work (about 64 x 25 ms on one core), small enough that a killed actor loses little and the driver
# sees progress often.
DEFAULT_IMAGES_PER_TASK = 64
# Rows per output file. A part is the unit of resumption: a job killed mid-way redoes at most this many images
# (per part not yet written), so smaller loses less work and makes more files.
DEFAULT_ROWS_PER_FILE = 10_000
# A part is also written when this many seconds have passed since the last one, so a slow job still saves work.
FLUSH_AFTER_S = 60.0
# Batches each actor of run_job has queued at once: one running and one waiting, so an actor never idles while
# the driver lists, and the driver holds no more than this many batches of inputs at a time.
TASKS_PER_ACTOR = 2
# A job whose first this-many inputs all fail with the same error stops (--fail-fast): missing credentials on the
# workers, a wrong prefix, a broken mount; each failure may take a network timeout of its own.
DEFAULT_FAIL_FAST = 50
# How often run_job reports progress (on_progress), in seconds.
PROGRESS_EVERY_S = 10.0


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
                    model_name=spec.display_name, architecture=spec.name, topk=topk, rows_per_file=rows_per_file, images_per_task=images_per_task,
                    fail_fast=fail_fast, on_error=on_error, on_progress=on_progress,
                    progress_every_s=progress_every_s)
    finally:
        directory.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _stream(ray: Any, pool: list[Any], described: Any, directory: ResultsDirectory, state: OutputState,
            summary: JobSummary, started: float, started_at: str, inputs: Iterator[InputRow], *, model_name: str,
            architecture: str, topk: int, rows_per_file: int, images_per_task: int, fail_fast: int,
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
                    # The rows an actor writes for a failed image, as ClassificationResult names them.
                    take(results_table([{"input": row.input, "key": row.key, "model": model_name,
                                         "architecture": architecture, "predictions": None,
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
