"""The Spark route: the function for ``DataFrame.mapInArrow`` that gives the rows ``classify-dataset`` writes.

Spark ships that function to its Python workers by value (cloudpickle), with copies of the globals it names, once
per task: the cache of predictors is reached through :func:`_worker_predictor`, a module-level function, which
cloudpickle ships by reference, so every task in a worker process finds this module's one cache."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .predictor import MixnetPredictor

if TYPE_CHECKING:
    import pyarrow


# One predictor per Python worker process, by its settings: Spark reuses its Python workers between tasks
# (spark.python.worker.reuse, on by default), so the model loads once per worker, not once per partition.
_SPARK_PREDICTORS: dict[str, MixnetPredictor] = {}


def _worker_predictor(settings: str, model: str | None, predictor_options: dict[str, Any]) -> MixnetPredictor:
    """This worker process's predictor for ``settings``, made by its first task."""
    predictor = _SPARK_PREDICTORS.get(settings)
    if predictor is None:
        predictor = _SPARK_PREDICTORS[settings] = MixnetPredictor(model, **predictor_options)
    return predictor


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
        predictor = _worker_predictor(settings, model, predictor_options)
        for batch in batches:
            if batch.num_rows:
                yield from predictor(batch).to_batches()

    return classify
