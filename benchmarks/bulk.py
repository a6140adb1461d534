"""Goal 3: classifying a directory of photos against the forward pass alone, interleaved.

Forward-only throughput is the default engine on already-preprocessed batches, images/s at each batch size in
both of its modes: one batch at a time (latency mode) and its bulk sibling with as many batches in flight as it
runs at once (``Engine.throughput``); the best is the ceiling. The pipeline is ``Classifier.classify_many`` over the photo files (decode, resize,
normalise in threads while the engine runs) for a grid of batch sizes and decode workers; the end-to-end
figure is `mixnet classify DIR --jsonl` (a fresh process, its defaults), process start and model load included.

The goal ratio (issue: >= 0.70x) is end to end over forward only: images/s of `mixnet classify DIR --jsonl`, wall
clock from process start to exit, against the same engine's best forward-only images/s (best mode and batch size
by median, on batches already in memory), both measured in the same round and paired by round; the median of
those per-round ratios is reported. ``--baseline DIR`` also times another checkout's `mixnet classify DIR --jsonl`
(``PYTHONPATH=DIR``) in the same rounds, in a random order with this one's, for before/after figures from one run;
``--no-grid`` leaves out the ``classify_many`` grid (only the default pipeline is timed).

    python benchmarks/bulk.py --home /tmp/mixnet-bench --out bulk.json [--images DIR] [--rounds 5]
                              [--baseline DIR] [--no-grid]
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import (SAMPLES, arguments, clean_env, log, machine, mixnet_executable, prepare_home, run_process, sample_images,
                     summary, write_json)

import numpy as np

BATCH_SIZES = (1, 2, 4, 8)
WORKERS = (1, 2)


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, rounds=5)
    parser.add_argument("--images", type=Path, default=SAMPLES)
    parser.add_argument("--model", default="MixNet_S")
    parser.add_argument("--baseline", type=Path, help="another checkout whose `mixnet classify DIR` is timed beside")
    parser.add_argument("--no-grid", action="store_true", help="time only the default classify_many pipeline")
    args = parser.parse_args(argv)
    prepare_home(args.home, [args.model])
    os.environ["MIXNET_HOME"] = str(args.home)
    from mixnet_cli import Classifier

    images = sample_images(directory=args.images)
    classifier = Classifier(args.model, device="cpu")
    engine = classifier.engine
    modes = {"latency mode": engine}
    for size in BATCH_SIZES:
        bulk = engine.throughput(size)
        modes[f"{bulk.parallel} batches in flight"] = bulk
    prepared = [classifier.preprocess(path) for path in images[:16]]
    decode_ms = summary([1000 * _timed(lambda p=p: classifier.preprocess(p)) for p in images[:60]])
    for size in BATCH_SIZES:  # compile every fixed-size model before timing
        for runner in modes.values():
            runner.run(np.stack(prepared[:size]))
            runner.run(np.stack(prepared[:size]))
    mixnet = str(mixnet_executable())
    forward: dict[tuple[str, int], list[float]] = {(mode, size): [] for mode in modes for size in BATCH_SIZES}
    defaults = _defaults()
    default_name = f"batch {defaults['cli_batch_size']}, {defaults['classify_many_workers']} worker(s)"
    grid = [(b, w) for b in BATCH_SIZES for w in WORKERS]
    if args.no_grid:
        grid = [(defaults["cli_batch_size"], defaults["classify_many_workers"])]
    pipeline: dict[str, list[float]] = {f"batch {b}, {w} worker(s)": [] for b, w in grid}
    cli: list[float] = []
    baseline: list[float] = []
    paired: list[float] = []  # per round: the default pipeline / the forward rate at the best batch size
    at_start = machine()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mixnet-bench-") as scratch:
        env = clean_env(args.home, Path(scratch) / "pycache")
        directory = Path(scratch) / "photos"
        directory.mkdir()
        for path in images:
            os.symlink(path.resolve(), directory / path.name)
        run_process([mixnet, "classify", str(directory), "--jsonl"], env)  # bytecode, disk cache
        base_env = None
        if args.baseline is not None:
            base_env = clean_env(args.home, Path(scratch) / "pycache-baseline")
            base_env["PYTHONPATH"] = str(args.baseline.resolve())
            run_process([mixnet, "classify", str(directory), "--jsonl"], base_env)
        for index in range(args.rounds):
            log(f"bulk: round {index + 1}/{args.rounds}")
            for b in BATCH_SIZES:
                batch = np.stack(prepared[:b])
                for mode, runner in modes.items():
                    forward[(mode, b)].append(_forward_rate(runner, batch, max(8, 96 // b)))
                for w in WORKERS:
                    if (b, w) in grid:
                        seconds = _timed(lambda: list(classifier.classify_many(images, batch_size=b, workers=w)))
                        pipeline[f"batch {b}, {w} worker(s)"].append(len(images) / seconds)
            commands = [(cli, env)] + ([(baseline, base_env)] if base_env is not None else [])
            random.shuffle(commands)  # neither always first after the forward passes
            for rates, environment in commands:
                seconds, _, _ = run_process([mixnet, "classify", str(directory), "--jsonl"], environment)
                rates.append(len(images) / seconds)

    forward_summary = {f"{mode}, batch {size}": summary(values) for (mode, size), values in forward.items()}
    best_forward = max(s["median"] for s in forward_summary.values())
    # The best mode and batch size by median, then the default pipeline against that one's forward rate
    # measured in the same round (taking each round's maximum would reward noise).
    best = max(forward, key=lambda key: statistics.median(forward[key]))
    if default_name in pipeline:
        paired = [p / f for p, f in zip(pipeline[default_name], forward[best])]
    # The goal's ratio: end to end over the best forward-only rate, paired by round.
    cli_paired = [c / f for c, f in zip(cli, forward[best])]
    baseline_paired = [c / f for c, f in zip(baseline, forward[best])]
    pipeline_summary = {name: summary(values) for name, values in pipeline.items()}
    write_json(args.out, {
        "machine": at_start, "load_average_at_end": list(os.getloadavg()), "rounds": args.rounds, "seconds": time.time() - started, "model": args.model,
        "images": len(images), "engine": f"{engine.name} ({engine.detail}; in bulk: {engine.throughput().detail})",
        "decode_and_transform_ms_per_image": decode_ms,
        "forward_images_per_s": forward_summary,
        "best_forward_images_per_s": best_forward,
        "best_forward": f"{best[0]}, batch {best[1]}",
        "pipeline_images_per_s": pipeline_summary,
        "cli_images_per_s": summary(cli),
        "defaults": defaults,
        "default_pipeline_to_best_forward_paired": summary(paired) if paired else None,
        "cli_to_best_forward_paired": summary(cli_paired),
        "baseline": str(args.baseline) if args.baseline is not None else None,
        "baseline_cli_images_per_s": summary(baseline) if baseline else None,
        "baseline_cli_to_best_forward_paired": summary(baseline_paired) if baseline_paired else None,
        "cli_to_baseline_paired": summary([c / b for c, b in zip(cli, baseline)]) if baseline else None,
    })
    log(f"wrote {args.out}")
    return 0


def _forward_rate(runner, batch: np.ndarray, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Images/s running ``repeats`` batches on ``runner``, from as many threads as it runs batches at once."""
    share = [repeats // runner.parallel + (i < repeats % runner.parallel) for i in range(runner.parallel)]
    threads = [threading.Thread(target=lambda n=n: [runner.run(batch) for _ in range(n)]) for n in share]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(batch) * repeats / (time.perf_counter() - start)


def _timed(function) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _defaults() -> dict[str, int]:
    """classify_many's own defaults, and the CLI's --batch-size default (what a user gets)."""
    import inspect

    from mixnet_cli.classifier import Classifier
    from mixnet_cli.cli.classify import classify

    parameters = inspect.signature(Classifier.classify_many).parameters
    cli_batch = next(p.default for p in classify.params if p.name == "batch_size")
    return {"classify_many_batch_size": parameters["batch_size"].default,
            "classify_many_workers": parameters["workers"].default, "cli_batch_size": cli_batch}


if __name__ == "__main__":
    sys.exit(main())
