"""Ray against the local CLI on the same images: `mixnet classify-dataset DIR -o OUT` (Ray on this machine
alone, started and stopped by the command) and `mixnet classify DIR --jsonl -o FILE`, each a fresh process as a
user runs it, plus both on a handful of images for the fixed start-up cost; then a scaling estimate for N nodes.

Wall seconds; CPU seconds and peak resident memory of the whole process tree (the command and everything it
starts: Ray's GCS, raylet, workers), sampled from /proc every 0.1 s (a process that ends between two samples
loses at most its last 0.1 s of CPU). The photos are `--copies` copies of the sample photos (2000 from 200),
each copy in its own folder so every file is a separate input. Needs the [ray] extra.

    python benchmarks/ray_scale.py --home /tmp/mixnet-bench --out ray.json [--model S] [--copies 10] [--rounds 2]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from _common import SAMPLES, arguments, clean_env, log, machine, mixnet_executable, prepare_home, sample_images, write_json

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _cpu_and_rss(pid: int) -> tuple[float, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime, stime (fields 14, 15 of stat; 12, 13 after the name) and rss in pages (field 24; 22 here).
    return (int(fields[11]) + int(fields[12])) / _TICKS, int(fields[21]) * _PAGE


def measure(command: Sequence[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``command``; its wall seconds, the CPU seconds and peak summed RSS (MiB) of its process tree, and the
    last line of its stderr."""
    cpu_by_pid: dict[int, float] = {}
    peak_rss = 0
    start = time.perf_counter()
    process = subprocess.Popen(list(command), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while process.poll() is None:
        rss = 0
        for pid in _tree(process.pid):
            sample = _cpu_and_rss(pid)
            if sample:
                cpu_by_pid[pid] = max(cpu_by_pid.get(pid, 0.0), sample[0])
                rss += sample[1]
        peak_rss = max(peak_rss, rss)
        time.sleep(0.1)
    wall = time.perf_counter() - start
    reader.join(timeout=10)
    if process.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {''.join(stderr)[-2000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(sum(cpu_by_pid.values()), 2),
            "command_cpu_s": round(cpu_by_pid.get(process.pid, 0.0), 2),  # for Ray: the driver alone
            "peak_rss_mib": round(peak_rss / 2**20), "processes": len(cpu_by_pid),
            "stderr_tail": [line.rstrip() for line in stderr[-3:]]}


def copy_images(sources: list[Path], directory: Path, copies: int) -> Path:
    for copy in range(copies):
        folder = directory / f"copy{copy:02d}"
        folder.mkdir(parents=True)
        for source in sources:
            shutil.copyfile(source, folder / source.name)
    return directory


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def driver_work_ms(images: Path, model: str, scratch: Path) -> float:
    """The driver's own work per image, in-process: listing the inputs, and turning result rows (5 predictions
    each) into a checked Arrow table written as one Parquet part, as :func:`run_job` does. Best of 3."""
    from mixnet_cli.classifier import ClassificationResult, Prediction
    from mixnet_cli.distributed import ResultsDirectory, list_inputs, result_row, result_schema, results_table
    from mixnet_cli.base.manifest import resolve_model

    name = resolve_model(model).name
    best = float("inf")
    for attempt in range(3):
        start = time.process_time()
        listing = list_inputs([str(images)], name)
        rows = [result_row(ClassificationResult(row["input"], name, tuple(
            Prediction(class_id=k, label="label", score=1.0 / (k + 2)) for k in range(5)))) for row in listing.rows]
        table = results_table(rows).cast(result_schema())
        table.filter(table.column("error").is_valid())
        directory = ResultsDirectory(str(scratch / f"driver-{attempt}"))
        directory.open(resume=False)
        directory.write(table)
        directory.close()
        best = min(best, (time.process_time() - start) * 1000 / len(rows))
    return best


def derive(runs: dict[str, list[dict[str, Any]]], count: int, small: int, steady: list[float],
           driver_ms: float) -> dict[str, Any]:
    """Fixed start-up (the small runs), CPU per image beyond it (big minus small, per extra image), and the
    scaling estimate: N nodes, each running one actor like this one at the steady rate measured here, take
    ``fixed + M / (N x rate)`` seconds for M images, unless the driver (its CPU per image) or the storage is the
    limit first."""
    def med(name: str, key: str) -> float:
        return _median([run[key] for run in runs[name]])

    derived: dict[str, Any] = {}
    for route in ("local", "ray"):
        extra = count - small
        derived[route] = {
            "startup_wall_s": med(f"{route} {small}", "wall_s"),
            "startup_cpu_s": med(f"{route} {small}", "cpu_s"),
            "cpu_ms_per_image": round(1000 * (med(f"{route} {count}", "cpu_s") - med(f"{route} {small}", "cpu_s")) / extra, 2),
            "wall_images_per_s": round(count / med(f"{route} {count}", "wall_s"), 1),
            "peak_rss_mib": med(f"{route} {count}", "peak_rss_mib"),
        }
    rate = _median(steady) if steady else 0.0
    # The driver's CPU in the big run, start-up included: its start-up varies more between runs than its work
    # for 2000 images does, so only the driver's own work measured alone (driver_ms) gives its ceiling.
    derived["ray"]["steady_images_per_s_per_actor"] = rate
    derived["ray"]["driver_cpu_ms_per_image_with_startup"] = round(1000 * med(f"ray {count}", "command_cpu_s") / count, 2)
    derived["ray"]["driver_work_ms_per_image"] = round(driver_ms, 3)
    fixed = derived["ray"]["startup_wall_s"]
    ceiling = 1000 / driver_ms if driver_ms else float("inf")
    derived["estimate_1M_images"] = {
        str(nodes): {"images_per_s": round(min(nodes * rate, ceiling), 1),
                     "hours": round((fixed + 1e6 / min(nodes * rate, ceiling)) / 3600, 2) if rate else None}
        for nodes in (1, 2, 4, 8, 16, 32, 64)
    }
    derived["driver_ceiling_images_per_s"] = round(ceiling)
    return derived


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, rounds=1)
    parser.add_argument("--images", type=Path, default=SAMPLES)
    parser.add_argument("--model", default="MixNet_S")
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--small", type=int, default=8, help="images of the start-up runs")
    parser.add_argument("--reuse", type=Path, help="an earlier --out: keep its runs, measure the driver's work")
    args = parser.parse_args(argv)
    prepare_home(args.home, [args.model], formats=["auto"])
    mixnet = str(mixnet_executable())
    photos = sample_images(directory=args.images)
    results: dict[str, Any] = {"machine": machine(), "model": args.model, "rounds": args.rounds}
    if args.reuse:  # only the driver's work measured again, and the estimate from an earlier run's timings
        results = json.loads(args.reuse.read_text())
    with tempfile.TemporaryDirectory(prefix="mixnet-ray-bench-") as scratch_name:
        scratch = Path(scratch_name)
        big = copy_images(photos, scratch / "big", args.copies)
        small = copy_images(photos[: args.small], scratch / "small", 1)
        count = len(photos) * args.copies
        results["driver_work_ms_per_image"] = driver_work_ms(big, args.model, scratch)
        env = clean_env(args.home, scratch / "pycache")
        env.update(RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)
        runs: dict[str, list[dict[str, Any]]] = results.get("runs", {})
        for round_index in range(0 if args.reuse else args.rounds):
            for label, images, n in (("small", small, args.small), ("big", big, count)):
                out = scratch / f"out-{label}-{round_index}"
                for name, command in (
                    (f"local {n}", [mixnet, "classify", str(images), "--model", args.model, "--jsonl", "-q",
                                    "-o", str(out) + ".jsonl"]),
                    (f"ray {n}", [mixnet, "classify-dataset", str(images), "--model", args.model, "-o", str(out),
                                  "-q"]),
                ):
                    log(f"{name} (round {round_index + 1})...")
                    result = measure(command, env)
                    result["images"] = n
                    runs.setdefault(name, []).append(result)
                    log(f"  {result}")
    results["runs"] = runs
    # The Ray run's rate after its start-up, from its summary line: images / (whole job - start-up).
    steady = []
    for run in runs[f"ray {count}"]:
        found = re.search(r"(\d+) image\(s\) classified in ([\d.]+) s \([\d.]+ images/s over the whole job, of "
                          r"which ([\d.]+) s start-up\)", " ".join(run["stderr_tail"]))
        if found:
            images, seconds, startup = int(found.group(1)), float(found.group(2)), float(found.group(3))
            steady.append(images / (seconds - startup) if seconds > startup else 0.0)
    results["ray_steady_images_per_s"] = steady
    results["derived"] = derive(runs, count, args.small, steady, results["driver_work_ms_per_image"])
    write_json(args.out, results)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
