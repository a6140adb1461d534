"""`mixnet serve` over the Open Inference Protocol v2 against its own /v1, side by side on one service: one photo
per request, top 5 asked, from 1, 4 and 16 client threads, as (a) a raw body to /v1/classify (requests), (b) the
binary-data extension from tritonclient (`InferRequestedOutput(class_count=5)`), (c) JSON with the photo in
base64 from tritonclient (`binary_data=False`). The three alternate within each round, so drifting load on the
machine touches each alike; each cell keeps its best round.

    python benchmarks/serve_v2.py --home /tmp/mixnet-bench --out serve_v2.json --images DIR [--rounds 2]

Triton's perf_analyzer would be the standard load generator for v2; where it cannot be installed (PyPI offers it
for some platforms only), this is the measurement. Writes JSON to --out and a markdown section to stdout.
"""

from __future__ import annotations

import base64
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import SAMPLES, arguments, clean_env, log, machine, prepare_home, sample_images, write_json
from serve import Service, load, percentile

CLIENTS = (1, 4, 16)
TOP = 5


def load_v2(url: str, bodies: list[bytes], clients: int, binary: bool, model: str) -> dict[str, Any]:
    """Every body once, one v2 infer each, from ``clients`` threads, each with its own tritonclient."""
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    next_index = iter(range(len(bodies)))
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    def client() -> None:
        triton = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
        output = httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=TOP)
        try:
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                data = bodies[index] if binary else base64.b64encode(bodies[index])
                started = time.perf_counter()
                image = httpclient.InferInput("image", [1], "BYTES")
                image.set_data_from_numpy(np.array([data], dtype=np.object_), binary_data=binary)
                try:
                    rows = triton.infer(model, [image], outputs=[output]).as_numpy("probabilities")
                    status = "200" if rows.shape == (1, TOP) else "wrong shape"
                except InferenceServerException as exc:
                    status = str(exc.status())
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed * 1000.0)
                    statuses[status] = statuses.get(status, 0) + 1
        finally:
            triton.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": len(bodies), "wall_s": wall, "images_per_s": len(bodies) / wall,
            "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99), "statuses": statuses}


def served_seconds(url: str, endpoint: str) -> tuple[float, float]:
    """The service's own count and total seconds of requests to ``endpoint`` so far (its /metrics histogram):
    time inside the service, without the client's."""
    import requests

    found = {"sum": 0.0, "count": 0.0}
    for line in requests.get(url + "/metrics", timeout=30).text.splitlines():
        for kind in found:
            if line.startswith(f'mixnet_http_request_duration_seconds_{kind}{{endpoint="{endpoint}"}}'):
                found[kind] = float(line.rsplit(" ", 1)[1])
    return found["count"], found["sum"]


ENDPOINTS = {"v1": "/v1/classify", "v2_binary": "/v2/models/{name}/infer", "v2_json": "/v2/models/{name}/infer"}
WAYS = {
    "v1": "(a) /v1/classify, raw body",
    "v2_binary": "(b) v2 infer, binary data",
    "v2_json": "(c) v2 infer, JSON base64",
}


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, rounds=2)
    parser.add_argument("--model", default="MixNet_S")
    parser.add_argument("--images", type=Path, default=SAMPLES)
    args = parser.parse_args(argv)
    prepare_home(args.home, [args.model])
    bodies = [photo.read_bytes() for photo in sample_images(200, args.images)]
    results: dict[str, Any] = {"machine": machine(), "model": args.model, "photos": len(bodies),
                               "rounds_run": args.rounds, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="mixnet-bench-") as scratch:
        service = Service(clean_env(args.home, Path(scratch) / "pycache"), args.model)
        try:
            ways = {
                "v1": lambda clients: load(service.url, bodies, clients),
                "v2_binary": lambda clients: load_v2(service.url, bodies, clients, True, args.model),
                "v2_json": lambda clients: load_v2(service.url, bodies, clients, False, args.model),
            }
            for way in ways.values():  # warm: first requests, connections, imports
                way(4)
            for round_index in range(args.rounds):
                for clients in CLIENTS:
                    for name, way in ways.items():
                        log(f"round {round_index + 1}: {name}, {clients} client(s)...")
                        count, seconds = served_seconds(service.url, ENDPOINTS[name])
                        row = way(clients)
                        count_after, seconds_after = served_seconds(service.url, ENDPOINTS[name])
                        row["served_mean_ms"] = (seconds_after - seconds) / max(count_after - count, 1) * 1000.0
                        results["rounds"].append({"round": round_index, "way": name, **row})
        finally:
            service.stop()
    best = {}
    for row in results["rounds"]:
        key = (row["way"], row["clients"])
        if key not in best or row["images_per_s"] > best[key]["images_per_s"]:
            best[key] = row
    results["best"] = [best[(name, clients)] for clients in CLIENTS for name in WAYS]
    write_json(args.out, results)
    print("\n".join(section(results)))
    return 0


def section(results: dict[str, Any]) -> list[str]:
    """The v2 section of BENCHMARKS.md (markdown lines)."""
    load_average = ", ".join(f"{value:.2f}" for value in results["machine"]["load_average"])
    lines = [
        "| how | clients | images/s | p50 ms | p99 ms | images/s vs /v1 | in the service, mean ms | statuses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(row["way"], row["clients"]): row for row in results["best"]}
    for row in results["best"]:
        v1 = by_key[("v1", row["clients"])]
        lines.append(f"| {WAYS[row['way']]} | {row['clients']} | {row['images_per_s']:.1f} | {row['p50_ms']:.1f} | "
                     f"{row['p99_ms']:.1f} | {row['images_per_s'] / v1['images_per_s']:.2f}x | "
                     f"{row['served_mean_ms']:.1f} | "
                     f"{', '.join(f'{k}: {v}' for k, v in sorted(row['statuses'].items()))} |")
    return lines + ["", f"{results['photos']} photos, {results['model']}, best of {results['rounds_run']} "
                    f"rounds per cell; load average {load_average} at the end.", ""]


if __name__ == "__main__":
    sys.exit(main())
