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

The package, one module per concern (lowest first; each imports only those above it):

- :mod:`.extra`: Ray and pyarrow, imported when a function needs them, or the one line saying what to install;
- :mod:`.rows`: the result row, its Arrow schema (and Spark's DDL), the input's canonical key;
- :mod:`.listing`: the inputs of a job, listed lazily (sources, URIs, manifests);
- :mod:`.predictor`: :class:`MixnetPredictor`, what each actor (or Spark worker) runs;
- :mod:`.cluster`: connecting to Ray, or starting it on this machine alone; the actor plan;
- :mod:`.lock` and :mod:`.directory`: the output directory (the job that owns it, its parts, what it holds);
- :mod:`.job`: :func:`run_job` and :func:`classify_dataset`, which use all of the above;
- :mod:`.spark`: :func:`spark_classify_batches`.

Part of the API layer: it imports :mod:`mixnet_cli.base`, :mod:`mixnet_cli.images`, :mod:`mixnet_cli.weights` and
:mod:`mixnet_cli.classifier`, never the service or the command line. The public names are re-exported here, so
code imports them from ``mixnet_cli.distributed`` whatever module holds them.
"""

from __future__ import annotations

from .rows import (
    SPARK_SCHEMA,
    canonical_key,
    is_uri,
    result_row,
    result_schema,
    results_table,
)
from .listing import (
    InputListing,
    InputRow,
    check_manifest,
    iter_inputs,
    list_inputs,
)
from .predictor import (
    MixnetPredictor,
    actor_device,
)
from .cluster import (
    CONNECT_TIMEOUT_S,
    MAX_ACTOR_RESTARTS,
    RESERVED_CPUS_PER_NODE,
    ActorPlan,
    plan_actors,
    ray_session,
)
from .lock import (
    HEARTBEAT_S,
    JOB_RECORD_NAME,
    LOCK_NAME,
    STALE_AFTER_S,
    JobLock,
)
from .directory import (
    JSONL_FOLDER,
    METADATA_PREFIX,
    PART_PREFIX,
    DoneSet,
    OutputState,
    ResultsDirectory,
    key_hash,
)
from .job import (
    DEFAULT_FAIL_FAST,
    DEFAULT_IMAGES_PER_TASK,
    DEFAULT_ROWS_PER_FILE,
    FLUSH_AFTER_S,
    PROGRESS_EVERY_S,
    TASKS_PER_ACTOR,
    JobProgress,
    JobSummary,
    classify_dataset,
    job_progress,
    run_job,
)
from .spark import (
    spark_classify_batches,
)

__all__ = [
    "ActorPlan", "CONNECT_TIMEOUT_S", "DEFAULT_FAIL_FAST", "DEFAULT_IMAGES_PER_TASK", "DEFAULT_ROWS_PER_FILE",
    "DoneSet", "FLUSH_AFTER_S", "HEARTBEAT_S", "InputListing", "InputRow", "JOB_RECORD_NAME", "JSONL_FOLDER",
    "JobLock", "JobProgress", "JobSummary", "LOCK_NAME", "MAX_ACTOR_RESTARTS", "METADATA_PREFIX", "MixnetPredictor",
    "OutputState", "PART_PREFIX", "PROGRESS_EVERY_S", "RESERVED_CPUS_PER_NODE", "ResultsDirectory", "SPARK_SCHEMA",
    "STALE_AFTER_S", "TASKS_PER_ACTOR", "actor_device", "canonical_key", "check_manifest", "classify_dataset",
    "is_uri", "iter_inputs", "job_progress", "key_hash", "list_inputs", "plan_actors", "ray_session", "result_row",
    "result_schema", "results_table", "run_job", "spark_classify_batches",
]
