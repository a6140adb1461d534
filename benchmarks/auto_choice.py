"""``auto`` on this CPU: its engine against the fastest same-answer engine, per model and batch size.

For each model, the engine ``auto`` picks (one per CPU and model, whatever the job) and every installed fp32 CPU
engine (all held to the same 1e-4 answers), timed at batch 1, 4 and 8 in
interleaved rounds (engines in a new random order each round, the fastest of 3 back-to-back runs per sample),
medians. The ratio is ``auto``'s time over the fastest engine's at that batch size (goal: <= 1.05x).

    python benchmarks/auto_choice.py --home /tmp/mixnet-bench --out auto.json [--rounds 9] [--models MixNet_S]
"""

from __future__ import annotations

import os
import random
import statistics
import sys
from typing import Any

import numpy as np

from _common import MODELS, arguments, fastest_ms, log, machine, prepare_home, write_json

BATCH_SIZES = (1, 4, 8)
ENGINES = ("onnxruntime", "openvino")


def compute_floor_gflops(seconds: float = 3.0) -> float:
    """This machine's f32 arithmetic rate on all its cores: the fastest of repeated 1024 x 1024 float32 matrix
    products (numpy's BLAS), in GFLOP/s (2 flops per multiply-add)."""
    import time

    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    best = 0.0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        start = time.perf_counter()
        a @ a
        best = max(best, 2 * 1024 ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def measure(models: list[str], rounds: int, threads: int) -> dict[str, Any]:
    from mixnet_cli import Classifier
    from mixnet_cli.engines.choice import choose_engine

    results: dict[str, Any] = {}
    for model in models:
        engines = {name: Classifier(model, device="cpu", engine=name, threads=threads).engine for name in ENGINES}
        pick = choose_engine("auto", "cpu", model=model, threads=threads)
        samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCH_SIZES} for name in engines}
        for size in BATCH_SIZES:
            batch = np.random.default_rng(size).uniform(-2.1, 2.6, (size, 3, 224, 224)).astype(np.float32)
            for engine in engines.values():
                engine.run(batch)
            for _ in range(rounds):
                for name in random.sample(list(engines), len(engines)):
                    samples[name][size].append(fastest_ms(lambda: engines[name].run(batch), 3))
        medians = {name: {b: statistics.median(v) for b, v in by.items()} for name, by in samples.items()}
        fastest = {b: min(medians[name][b] for name in engines) for b in BATCH_SIZES}
        from mixnet_cli.network.architecture import architecture_of

        gflop = 2 * architecture_of(model).flops() / 1e9  # multiply-adds of the convolutions and the classifier
        floor = compute_floor_gflops()
        floor_ms = 1000 * gflop / floor
        results[model] = {
            "compute_floor": {"gflop_per_image": gflop, "gflops_measured": floor, "ms_per_image": floor_ms,
                              "best_fp32_batch8_ms_per_image_vs_floor": fastest[8] / 8 / floor_ms,
                              "best_fp32_batch1_vs_floor": fastest[1] / floor_ms},
            "median_ms": {name: {str(b): ms for b, ms in by.items()} for name, by in medians.items()},
            "auto": {"engine": pick.engine, "reason": pick.engine_reason},
            "auto_vs_fastest": {str(b): medians[pick.engine][b] / fastest[b] for b in BATCH_SIZES},
        }
        log(f"{model}: {results[model]['median_ms']}; auto {pick.engine}: {results[model]['auto_vs_fastest']}; "
            f"floor {results[model]['compute_floor']}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, rounds=9)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    from mixnet_cli.engines.base import physical_cores

    prepare_home(args.home, args.models, formats=list(ENGINES))
    os.environ["MIXNET_HOME"] = str(args.home)
    about = machine()
    results = measure(args.models, args.rounds, args.threads or physical_cores())
    write_json(args.out, {"machine": about, "machine_after": machine(), "rounds": args.rounds, "models": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
