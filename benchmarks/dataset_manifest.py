"""`mixnet classify-dataset --files-from MANIFEST` on manifests of 1,000 / 100,000 / 1,000,000 lines: the driver's
peak memory and the time to the first part file, interleaved rounds, on a Ray cluster this script starts on
127.0.0.1 and keeps for all runs (so Ray's start-up is apart: the job's own start-up is in the figures).

Each manifest cycles over the sample photos (each line one input, the same photo named many times), so every run
does the same work until its first part; the driver is killed once the first part is there. The driver's peak
resident memory is its VmHWM (the driver process alone: the cluster and the actors are not its children's cost).
Then, without Ray: reading a 1,000,000-line manifest through `iter_inputs` (time, memory), and reading the done set
of an output of 1,000,000 rows (`--resume`: time, memory).

    python benchmarks/dataset_manifest.py --home /tmp/mixnet-bench --out manifest.json [--rounds 2]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from _common import ROOT, arguments, log, machine, prepare_home, sample_images, write_json

SIZES = (1_000, 100_000, 1_000_000)
ROWS_PER_FILE = 500


def _vm(pid: int, field: str) -> int:
    """A /proc/PID/status field in KiB (VmHWM: peak resident memory), 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def first_part(manifest: Path, address: str, home: Path, work: Path) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(dir=work, prefix="out-"))
    env = {**os.environ, "MIXNET_HOME": str(home), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "mixnet_cli", "classify-dataset", "--files-from", str(manifest), "-o",
               str(out), "--address", address, "--offline", "-q", "--rows-per-file", str(ROWS_PER_FILE),
               "--engine", "onnxruntime"]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    try:
        while not any(out.glob("part-*.parquet")):
            if process.poll() is not None:
                raise RuntimeError(f"the job ended first: {process.stderr.read()}")
            peak = max(peak, _vm(process.pid, "VmHWM"))
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        peak = max(peak, _vm(process.pid, "VmHWM"))
    finally:
        process.kill()
        process.wait()
    return {"first_part_s": seconds, "driver_peak_mib": peak / 1024}


def manifest_alone(manifest: Path) -> dict[str, float]:
    code = f"""
import resource, time
from mixnet_cli.distributed import iter_inputs
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
count = sum(1 for _ in iter_inputs([], files_from={str(manifest)!r}))
print(count, time.perf_counter() - started, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    count, seconds, before, after = done.stdout.split()
    return {"lines": int(count), "seconds": float(seconds), "peak_mib": int(after) / 1024,
            "growth_mib": (int(after) - int(before)) / 1024}


def done_set(rows: int, work: Path) -> dict[str, float]:
    """An output of ``rows`` rows (10 parts) written by one process, its done set read by a fresh one (what
    ``--resume`` does before Ray starts): seconds, the set's own bytes, and the reader's peak memory above a
    process that only imported the same libraries."""
    out = work / "resume"
    write = f"""
import os, pyarrow as pa, pyarrow.parquet as pq
from mixnet_cli.distributed import result_schema
os.makedirs({str(out)!r}, exist_ok=True)
keys = [f"/data/photos/{{i // 1000:04d}}/{{i:08d}}.jpg" for i in range({rows})]
table = pa.table({{"input": keys, "key": keys, "model": ["MixNet_S"] * len(keys),
                  "predictions": pa.nulls(len(keys), result_schema().field("predictions").type),
                  "error": pa.nulls(len(keys), result_schema().field("error").type)}}, schema=result_schema())
table = table.replace_schema_metadata({{"mixnet.model": "MixNet_S"}})
for part in range(10):
    pq.write_table(table.slice(part * len(keys) // 10, len(keys) // 10), f"{str(out)}/part-x-{{part:06d}}.parquet")
"""
    read = f"""
import resource, sys, time, numpy, pyarrow.parquet
from mixnet_cli.distributed import ResultsDirectory
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "read":
    started = time.perf_counter()
    directory = ResultsDirectory({str(out)!r})
    state = directory.open(resume=True)
    seconds = time.perf_counter() - started
    directory.close()
    print(len(state.done), seconds, state.done.nbytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
else:
    print(before)
"""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", write], check=True, env=environment)
    baseline = int(subprocess.run([sys.executable, "-c", read, "baseline"], capture_output=True, text=True,
                                  check=True, env=environment).stdout)
    done = subprocess.run([sys.executable, "-c", read, "read"], capture_output=True, text=True, check=True,
                          env=environment)
    count, seconds, nbytes, peak = done.stdout.split()
    return {"rows": int(count), "seconds": float(seconds), "done_set_mib": int(nbytes) / 2**20,
            "peak_above_imports_mib": (int(peak) - baseline) / 1024}


def main() -> None:
    options = arguments(__doc__, rounds=2).parse_args()
    import ray

    home = prepare_home(Path(options.home), models=["MixNet_S"], formats=["onnxruntime"])
    work = Path(tempfile.mkdtemp(prefix="mixnet-manifest-"))
    photos = [str(path) for path in sample_images()]
    manifests = {}
    for size in SIZES:
        manifests[size] = work / f"manifest-{size}.txt"
        with open(manifests[size], "w") as stream:
            stream.writelines(photos[index % len(photos)] + "\n" for index in range(size))
    temp_dir = tempfile.mkdtemp(prefix="mxb")
    context = ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, _temp_dir=temp_dir,
                       logging_level="warning")
    address = context.address_info["gcs_address"]
    results: dict[str, Any] = {"machine": machine(), "rows_per_file": ROWS_PER_FILE, "runs": {}}
    try:
        for round_ in range(options.rounds):
            for size in SIZES:
                log(f"round {round_ + 1}: {size:,} lines")
                results["runs"].setdefault(str(size), []).append(first_part(manifests[size], address, home, work))
    finally:
        ray.shutdown()
    results["manifest_alone"] = manifest_alone(manifests[SIZES[-1]])
    results["done_set"] = done_set(1_000_000, work)
    write_json(Path(options.out), results)
    for size, runs in results["runs"].items():
        log(f"{size:>9} lines: " + ", ".join(f"first part {run['first_part_s']:.1f} s, driver {run['driver_peak_mib']:.0f} MiB"
                                            for run in runs))
    log(f"manifest alone: {results['manifest_alone']}")
    log(f"done set: {results['done_set']}")


if __name__ == "__main__":
    main()
