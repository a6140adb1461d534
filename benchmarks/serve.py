"""`mixnet serve` against the command line, side by side in one run: throughput and p50/p99 latency of the
service with 1, 4, 16 and 64 concurrent clients each sending one photo per request, against (a) a cold
`mixnet classify` run once per photo, (b) one `mixnet classify` over all the photos, (c) the forward pass alone
(the ceiling: no decoding, no HTTP). With --sweep, also the batching options (max batch size, max wait) at 1 and
16 clients, which is where the service's defaults come from.

    python benchmarks/serve.py --home /tmp/mixnet-bench --out serve.json [--sweep] [--model MixNet_S]

The clients are threads of this process (requests, one session each) on the same machine as the service, so
they take some of its CPU, as clients on the same host would. Writes the results as JSON to --out and a markdown
section to stdout.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from _common import (SAMPLES, arguments, clean_env, log, machine, mixnet_executable, prepare_home, run_process,
                     sample_images, write_json)

CLIENTS = (1, 4, 16, 64)


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Service:
    """`mixnet serve` in its own process, ready when constructed; stopped with SIGTERM."""

    def __init__(self, env: dict[str, str], model: str, *options: str) -> None:
        import requests

        self.url = f"http://127.0.0.1:{free_port()}"
        started = time.perf_counter()
        # stderr to a file: a pipe nobody reads could fill and stall the service.
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [str(mixnet_executable()), "serve", "--model", model, "--port", self.url.rsplit(":", 1)[1],
             "--no-access-log", *options], env=env, stdout=subprocess.DEVNULL, stderr=self.stderr)
        while True:
            if self.process.poll() is not None:
                self.stderr.seek(0)
                raise RuntimeError(f"mixnet serve exited: {self.stderr.read().decode(errors='replace')}")
            try:
                if requests.get(self.url + "/readyz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        self.ready_s = time.perf_counter() - started

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        self.stderr.seek(0)
        errors = [line for line in self.stderr.read().decode(errors="replace").splitlines()
                  if line.startswith(("Error", "Warning"))]
        self.stderr.close()
        if errors:
            log("the service said: " + " | ".join(errors[-5:]))


def load(url: str, bodies: list[bytes], clients: int) -> dict[str, Any]:
    """Every body once, as one request each, from ``clients`` threads at once: throughput and latency."""
    import requests

    sessions = threading.local()
    opened: list[Any] = []
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    def client() -> None:
        session = getattr(sessions, "session", None) or requests.Session()
        sessions.session = session
        opened.append(session)
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            started = time.perf_counter()
            try:
                status = session.post(url + "/v1/classify", data=bodies[index], timeout=120).status_code
            except requests.ConnectionError:
                status = 0  # counted, not retried: a reset is part of what a client sees
                session = sessions.session = requests.Session()
                opened.append(session)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed * 1000.0)
                statuses[status] = statuses.get(status, 0) + 1

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - started
    for session in opened:  # each level starts from new connections
        session.close()
    return {"clients": clients, "requests": len(bodies), "wall_s": wall, "images_per_s": len(bodies) / wall,
            "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
            "statuses": {str(k) if k else "connection reset": v for k, v in sorted(statuses.items())}}


def forward_ceiling(home: Path, model: str) -> dict[str, Any]:
    """The forward pass alone, in this process, at batch 1, 4 and 8: the best images/s is the ceiling."""
    os.environ["MIXNET_HOME"] = str(home)
    from mixnet_cli import Classifier
    from mixnet_cli.engines.choice import measure_latency

    classifier = Classifier(model, device="cpu")
    size = classifier.spec.preprocessing.crop_size
    rows = {}
    for batch in (1, 4, 8):
        latency = measure_latency(classifier.engine, batch, size, warmup=3, repeats=20)
        rows[batch] = {"median_ms": latency.median_ms, "images_per_s": latency.images_per_s}
    return {"by_batch": rows, "images_per_s": max(row["images_per_s"] for row in rows.values()),
            "engine": classifier.engine.detail}


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, rounds=1)
    parser.add_argument("--model", default="MixNet_S")
    parser.add_argument("--images", type=Path, default=SAMPLES)
    parser.add_argument("--cold-photos", type=int, default=20, help="photos classified by one cold run each")
    parser.add_argument("--sweep", action="store_true", help="also measure the batching options")
    args = parser.parse_args(argv)
    prepare_home(args.home, [args.model])
    photos = sample_images(200, args.images)
    bodies = [photo.read_bytes() for photo in photos]
    mixnet = str(mixnet_executable())
    results: dict[str, Any] = {"machine": machine(), "model": args.model, "photos": len(photos)}
    with tempfile.TemporaryDirectory(prefix="mixnet-bench-") as scratch:
        env = clean_env(args.home, Path(scratch) / "pycache")
        run_process([mixnet, "classify", str(photos[0]), "--model", args.model], env)  # bytecode, warm page cache

        log(f"(a) a cold `mixnet classify` per photo, {args.cold_photos} photos...")
        cold = [run_process([mixnet, "classify", str(photo), "--model", args.model], env)[0] * 1000.0
                for photo in photos[:args.cold_photos]]
        results["cold_per_photo"] = {"p50_ms": percentile(cold, 0.5), "p99_ms": percentile(cold, 0.99),
                                     "images_per_s": 1000.0 / statistics.mean(cold), "n": len(cold)}

        log(f"(b) one `mixnet classify` over {len(photos)} photos...")
        bulk = min(run_process([mixnet, "classify", *map(str, photos), "--model", args.model], env)[0]
                   for _ in range(max(1, args.rounds)))
        results["bulk"] = {"wall_s": bulk, "images_per_s": len(photos) / bulk}

        log("(c) the forward pass alone...")
        results["forward"] = forward_ceiling(args.home, args.model)

        log("the service, default options...")
        service = Service(env, args.model)
        try:
            results["service_ready_s"] = service.ready_s
            load(service.url, bodies[:20], 4)  # warm: first requests, connections
            results["service"] = [load(service.url, bodies, clients) for clients in CLIENTS]
        finally:
            service.stop()

        if args.sweep:
            results["sweep"] = []
            for batch, wait in ((1, 0), (4, 0), (4, 2), (4, 10), (8, 2), (16, 2)):
                log(f"the service, --max-batch-size {batch} --max-wait-ms {wait}...")
                service = Service(env, args.model, "--max-batch-size", str(batch), "--max-wait-ms", str(wait))
                try:
                    load(service.url, bodies[:20], 4)
                    one, sixteen = load(service.url, bodies[:100], 1), load(service.url, bodies, 16)
                finally:
                    service.stop()
                results["sweep"].append({"max_batch_size": batch, "max_wait_ms": wait, "one_client": one,
                                         "sixteen_clients": sixteen})
    write_json(args.out, results)
    print("\n".join(section(results)))
    return 0


ONE_PHOTO_TARGET = 0.10  # one photo through the warm service, as a fraction of a cold `mixnet classify`
SIXTEEN_CLIENTS_TARGET = 0.8  # images/s at 16 clients, as a multiple of one bulk `mixnet classify`


def summary_rows(results: dict[str, Any] | None, verdict: Any) -> list[str]:
    """The serve goals' rows of BENCHMARKS.md's summary table (none without results)."""
    if results is None:
        return []
    one, cold = results["service"][0], results["cold_per_photo"]
    sixteen = next(row for row in results["service"] if row["clients"] == 16)
    one_ratio = one["p50_ms"] / cold["p50_ms"]
    sixteen_ratio = sixteen["images_per_s"] / results["bulk"]["images_per_s"]
    return [
        f"| 6. serve: one photo through the warm service / a cold `mixnet classify` (p50) | {one_ratio * 100:.1f}% | "
        f"< {ONE_PHOTO_TARGET * 100:.0f}% | {verdict(one_ratio < ONE_PHOTO_TARGET)} |",
        f"| 6. serve: images/s with 16 clients / one bulk `mixnet classify` | {sixteen_ratio:.2f}x | "
        f"≥ {SIXTEEN_CLIENTS_TARGET}x | {verdict(sixteen_ratio >= SIXTEEN_CLIENTS_TARGET)} |",
    ]


def section(results: dict[str, Any]) -> list[str]:
    """The "Serve" section of BENCHMARKS.md (markdown lines)."""
    cold, bulk, forward = results["cold_per_photo"], results["bulk"], results["forward"]
    load = ", ".join(f"{value:.2f}" for value in results["machine"]["load_average"])
    lines = [
        "## Serve: `mixnet serve` against the command line",
        "",
        "`python benchmarks/serve.py --home DIR --out serve.json --sweep`, one run (also a step of run_all.py). "
        f"{results['photos']} photos, {results['model']}, one photo per request, sent by 1, 4, 16 and 64 client "
        "threads of the benchmark's own process (each photo once per row); the service with its default options. "
        "Throughput in images/s, latency per request in ms. The clients share the machine's 2 cores with the "
        f"service, and so did other processes (load average {load} at the end): compare ratios, not absolute "
        "times.",
        "",
        "| how | images/s | p50 ms | p99 ms | vs bulk classify |",
        "|---|---|---|---|---|",
        f"| (a) cold `mixnet classify` per photo ({cold['n']} photos) | {cold['images_per_s']:.1f} | "
        f"{cold['p50_ms']:.0f} | {cold['p99_ms']:.0f} | {cold['images_per_s'] / bulk['images_per_s']:.2f}x |",
        f"| (b) one `mixnet classify` over all | {bulk['images_per_s']:.1f} | | | 1.00x |",
        f"| (c) forward pass alone (best batch) | {forward['images_per_s']:.1f} | | | "
        f"{forward['images_per_s'] / bulk['images_per_s']:.2f}x |",
    ]
    for row in results["service"]:
        lines.append(f"| service, {row['clients']} client(s) | {row['images_per_s']:.1f} | {row['p50_ms']:.1f} | "
                     f"{row['p99_ms']:.1f} | {row['images_per_s'] / bulk['images_per_s']:.2f}x |")
    one = results["service"][0]
    sixteen = next(row for row in results["service"] if row["clients"] == 16)
    lines += [
        "",
        f"- One photo through the warm service: p50 {one['p50_ms']:.1f} ms = "
        f"{one['p50_ms'] / cold['p50_ms'] * 100:.1f}% of a cold `mixnet classify` (goal: under "
        f"{ONE_PHOTO_TARGET * 100:.0f}%).",
        f"- 16 clients: {sixteen['images_per_s'] / bulk['images_per_s']:.2f}x the throughput of one bulk "
        f"`mixnet classify` (goal: at least {SIXTEEN_CLIENTS_TARGET}x).",
        f"- The service was ready {results['service_ready_s']:.1f} s after it started (weights cached, converted).",
    ]
    if results.get("sweep"):
        lines += ["", "The batching options, one service each (1 client: 100 photos; 16 clients: 200):", "",
                  "| --max-batch-size | --max-wait-ms | 1 client p50 ms | 16 clients images/s | 16 clients p99 ms |",
                  "|---|---|---|---|---|"]
        for row in results["sweep"]:
            lines.append(f"| {row['max_batch_size']} | {row['max_wait_ms']} | {row['one_client']['p50_ms']:.1f} | "
                         f"{row['sixteen_clients']['images_per_s']:.1f} | {row['sixteen_clients']['p99_ms']:.1f} |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
