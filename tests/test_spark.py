"""The Spark route (`mixnet_cli.distributed.spark_classify_batches` in `mapInArrow`) on a local[2] Spark with its
JVM bound to 127.0.0.1: the same rows as `mixnet classify --jsonl` (and so as `classify-dataset`). Needs pyspark
(the [spark] extra) and a Java runtime; skipped, saying which is missing, without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

try:
    import pyarrow  # noqa: F401
    import pyspark  # noqa: F401
except ImportError as exc:
    pytest.skip(f'needs the [spark] extra (pip install "mixnet-cli[spark]"): {exc}', allow_module_level=True)
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("needs a Java runtime for Spark (java on PATH or JAVA_HOME)", allow_module_level=True)

pytestmark = [pytest.mark.spark, pytest.mark.slow]

MIXNET = [sys.executable, "-m", "mixnet_cli"]
# 13 images on local[2] take 5-15 s; a job still running after this has hung (its workers' stacks are printed).
SPARK_JOB_TIMEOUT_S = 180


def _collect_within(spark: Any, frame: Any, seconds: float) -> list[Any]:
    """``frame.collect()``, or a failure after ``seconds`` with the job cancelled (a hung Python worker would
    otherwise hold the run until CI cuts it)."""
    pool = ThreadPoolExecutor(max_workers=1)
    collected = pool.submit(frame.collect)
    try:
        return collected.result(timeout=seconds)
    except FutureTimeout:
        spark.sparkContext.cancelAllJobs()
        pytest.fail(f"the Spark job did not finish within {seconds:g} s; the Python workers' stacks are in "
                    "the captured stderr")
    finally:
        pool.shutdown(wait=False)  # not waiting for a collect that may never return


def _environment(home: Path) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MIXNET_")}
    environment["MIXNET_HOME"] = str(home)
    return environment


def test_map_in_arrow_gives_the_rows_of_classify(tmp_path, calibrated_server):
    from pyspark.sql import SparkSession

    from mixnet_cli.distributed import SPARK_SCHEMA, canonical_key, spark_classify_batches

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(12):
        size = (96 + 8 * (index % 7), 80 + 6 * (index % 5))
        image = Image.linear_gradient("L").resize(size).convert("RGB")
        image.paste(((37 * index) % 256, (91 * index) % 256, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
        image.save(photos / f"img{index:02d}.{'png' if index % 3 == 0 else 'jpg'}")
    (photos / "notes.jpg").write_text("not an image\n")
    home = tmp_path / "home"
    subprocess.run(MIXNET + ["download", "S"], env={**_environment(home), "MIXNET_MIRROR": calibrated_server.url},
                   check=True, capture_output=True, timeout=120)
    local = subprocess.run(MIXNET + ["classify", str(photos), "--jsonl", "--offline"], env=_environment(home),
                           capture_output=True, text=True, timeout=300)
    expected = {row["input"]: row for row in map(json.loads, local.stdout.splitlines())}
    assert len(expected) == 13 and local.returncode == 1  # the text file named .jpg

    # The Python workers inherit the driver's environment: the seeded cache, and loopback only.
    saved = {name: os.environ.get(name) for name in ("MIXNET_HOME", "SPARK_LOCAL_IP", "PYSPARK_PYTHON")}
    os.environ.update(MIXNET_HOME=str(home), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    spark = (SparkSession.builder.master("local[2]").appName("mixnet-test")
             .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.shuffle.partitions", "2").config("spark.local.dir", str(tmp_path / "spark"))
             # A Python worker that stops answering prints its stack every 30 s (into this test's stderr).
             .config("spark.python.worker.tracebackDumpIntervalSeconds", "30")
             .config("spark.python.worker.faulthandler.enabled", "true").getOrCreate())
    try:
        paths = spark.createDataFrame([(name,) for name in sorted(expected)], "path string").repartition(2)
        job = paths.mapInArrow(spark_classify_batches("S", offline=True, threads=1), SPARK_SCHEMA)
        rows = _collect_within(spark, job, SPARK_JOB_TIMEOUT_S)
    finally:
        spark.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    got: dict[str, dict[str, Any]] = {}
    for row in rows:
        row_dict = row.asDict(recursive=True)
        assert row_dict.pop("key") == canonical_key(row_dict["input"])
        got[row_dict["input"]] = {key: value for key, value in row_dict.items() if value is not None}
    assert len(rows) == len(got) == len(expected)
    assert got == expected


def test_the_tasks_of_one_worker_share_one_predictor(tmp_path, calibrated_server, monkeypatch):
    """PySpark unpickles the function once per task (cloudpickle, by value): each copy must still find the worker
    process's one predictor, so the model loads once per worker, not once per partition."""
    import pyarrow
    from pyspark import cloudpickle

    import mixnet_cli.distributed.spark as spark_module
    from mixnet_cli.distributed import spark_classify_batches

    home = tmp_path / "home"
    subprocess.run(MIXNET + ["download", "S"], env={**_environment(home), "MIXNET_MIRROR": calibrated_server.url},
                   check=True, capture_output=True, timeout=120)
    monkeypatch.setenv("MIXNET_HOME", str(home))
    monkeypatch.setattr(spark_module, "_SPARK_PREDICTORS", {})
    photo = tmp_path / "photo.png"
    Image.linear_gradient("L").resize((120, 90)).convert("RGB").save(photo)
    batch = pyarrow.RecordBatch.from_pydict({"path": [str(photo)]})

    shipped = cloudpickle.dumps(spark_classify_batches("S", offline=True, threads=1))
    rows = []
    for _task in range(2):
        task_function = cloudpickle.loads(shipped)
        rows += [row for result in task_function(iter([batch])) for row in result.to_pylist()]
    assert len(spark_module._SPARK_PREDICTORS) == 1
    assert [row["input"] for row in rows] == [str(photo)] * 2 and rows[0] == rows[1]
