"""The same photos through each dataset route, side by side, interleaved rounds: `mixnet classify DIR --jsonl -o
FILE` (local), `mixnet classify-dataset DIR -o OUT` starting its own Ray cluster, the same on an already-running
cluster (started by this script on 127.0.0.1, kept for every run), and Spark local[2] running
`spark_classify_batches` in `mapInArrow` (a fresh Spark per run, as a job would have). Wall seconds of each
command; for classify-dataset also the start-up it reports (until the first result). CPU seconds of the
command's process tree (for the running cluster: the driver alone, the actors being the cluster's).

    MIXNET_BENCH_IMAGES=.../imagenet-samples python benchmarks/dataset_routes.py --home /tmp/bench --out routes.json \
        [--copies 5] [--rounds 2]
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from _common import ROOT, arguments, log, machine, prepare_home, sample_images, write_json
from ray_scale import copy_images, measure

SPARK_JOB = """
import os, sys
from pyspark.sql import SparkSession
from mixnet_cli.distributed import SPARK_SCHEMA, spark_classify_batches
spark = (SparkSession.builder.master("local[2]").config("spark.driver.host", "127.0.0.1")
         .config("spark.driver.bindAddress", "127.0.0.1").config("spark.ui.enabled", "false").getOrCreate())
paths = spark.read.text(sys.argv[1]).withColumnRenamed("value", "path").repartition(2)
paths.mapInArrow(spark_classify_batches("S", threads=1, offline=True, engine="onnxruntime"),
                 SPARK_SCHEMA).write.parquet(sys.argv[2])
spark.stop()
"""


def main() -> None:
    parser = arguments(__doc__, rounds=2)
    parser.add_argument("--copies", type=int, default=5, help="copies of the 200 sample photos (default 5: 1000)")
    options = parser.parse_args()
    import ray

    home = prepare_home(Path(options.home), models=["MixNet_S"], formats=["onnxruntime"])
    work = Path(tempfile.mkdtemp(prefix="mixnet-routes-"))
    images = copy_images(sample_images(), work / "photos", options.copies)
    count = sum(1 for _ in images.rglob("*") if _.is_file())
    manifest = work / "manifest.txt"
    manifest.write_text("".join(f"{path}\n" for path in sorted(images.rglob("*")) if path.is_file()))
    mixnet = [sys.executable, "-m", "mixnet_cli"]
    temp_dir = tempfile.mkdtemp(prefix="mxb")
    context = ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, _temp_dir=temp_dir,
                       logging_level="warning")
    address = context.address_info["gcs_address"]
    # After ray.init: it puts the cluster's token in this environment, which the drivers need to connect.
    env = {**os.environ, "MIXNET_HOME": str(home), "PYTHONPATH": str(ROOT), "SPARK_LOCAL_IP": "127.0.0.1",
           "PYSPARK_PYTHON": sys.executable}
    own = {key: value for key, value in env.items() if not key.startswith("RAY_AUTH") and key != "RAY_ADDRESS"}
    results: dict[str, Any] = {"machine": machine(), "images": count, "runs": {}}
    try:
        for round_ in range(options.rounds):
            routes = {
                "classify (local)": mixnet + ["classify", str(images), "--jsonl", "-o", str(work / "local.jsonl"),
                                              "--offline", "--engine", "onnxruntime", "-q"],
                "classify-dataset, own cluster": mixnet + ["classify-dataset", str(images), "-o",
                                                           str(work / f"own-{round_}"), "--offline", "--engine",
                                                           "onnxruntime", "-q"],
                "classify-dataset, running cluster": mixnet + ["classify-dataset", str(images), "-o",
                                                               str(work / f"running-{round_}"), "--offline",
                                                               "--engine", "onnxruntime", "-q", "--address", address],
                "Spark local[2], mapInArrow": [sys.executable, "-c", SPARK_JOB, str(manifest),
                                               str(work / f"spark-{round_}")],
            }
            for name, command in routes.items():
                log(f"round {round_ + 1}: {name}")
                result = measure(command, env if "running" in name else own)
                found = re.search(r"of which ([\d.]+) s start-up", " ".join(result["stderr_tail"]))
                result["startup_s"] = float(found.group(1)) if found else None
                results["runs"].setdefault(name, []).append(result)
                log(f"  {result}")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    write_json(Path(options.out), results)


if __name__ == "__main__":
    main()
