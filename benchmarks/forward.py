"""Goal 1: forward-pass latency of every engine on the same weights, batch 1, 4 and 8, interleaved.

Besides mixnet's own engines (the default, and each ``--engine``), raw OpenVINO and ONNX Runtime sessions are
timed with other settings (library defaults, spinning threads, a fixed batch dimension, the throughput hint),
to check that mixnet's settings are the fastest we can find. Each variant's probabilities are compared with
paddle's eager network on a test batch: only variants within 1e-4 count as "the same model".

    python benchmarks/forward.py --home /tmp/mixnet-bench --out forward.json [--rounds 15] [--models MixNet_S]
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

from _common import MODELS, arguments, fastest_ms, log, machine, prepare_home, summary, write_json

import numpy as np

BATCH_SIZES = (1, 4, 8)
# Back-to-back runs per engine per turn, the fastest of which is the turn's sample: on a shared machine a burst of
# load from another process slows one run of an engine whose threads must meet at every layer by half or more,
# and with one run per turn a few such bursts decided which of two identical settings looked faster.
RUNS_PER_ROUND = 3
FIDELITY = 1e-4


class Variant:
    def __init__(self, name: str, family: str, run: Callable[[np.ndarray], np.ndarray], note: str = "") -> None:
        self.name = name
        self.family = family
        self.run = run
        self.note = note


def _ort_session(path: Path, *, threads: int | None, spinning: bool | None, fixed_batch: int | None,
                 defaults: bool = False) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if not defaults:
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if fixed_batch:
        batch_dim = session.get_inputs()[0].shape[0]
        options.add_free_dimension_override_by_name(str(batch_dim), fixed_batch)
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session


def _ort_runner(session: Any) -> Callable[[np.ndarray], np.ndarray]:
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def _ov_runner(path: Path, config: dict[str, Any], static_batch: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    import openvino

    core = openvino.Core()
    if static_batch:
        model = core.read_model(str(path))
        model.reshape([static_batch, 3, 224, 224])
        compiled = core.compile_model(model, "CPU", config)
    else:
        compiled = core.compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda batch: np.array(request.infer([batch])[0])


def build_variants(model: str, home: Path, threads: int) -> tuple[list[Variant], Any]:
    """The variants for ``model``, and the dygraph reference engine (for the fidelity check)."""
    os.environ["MIXNET_HOME"] = str(home)
    from mixnet_cli import Classifier
    from mixnet_cli.engines.conversion import cached_model

    default = Classifier(model, device="cpu")
    variants = [Variant(f"mixnet default ({default.engine.name})", "mixnet", default.engine.run, default.engine.detail)]
    from mixnet_cli.base.third_party import module_installed

    for engine in ("openvino", "onnxruntime", "paddle", "torch", "dygraph"):
        if engine == default.engine.name or (engine == "torch" and not module_installed("torch")):
            continue
        classifier = Classifier(model, device="cpu", engine=engine)
        variants.append(Variant(f"mixnet --engine {engine}", "paddle" if engine in ("paddle", "dygraph") else "mixnet",
                                classifier.engine.run, classifier.engine.detail))
        if engine == "dygraph":
            reference = classifier.engine
    spec = default.spec
    onnx_path = cached_model(spec, default.weights.record.sha256, "onnx").file(".onnx")
    f32 = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    variants += [
        Variant("openvino: library defaults", "raw", _ov_runner(onnx_path, {}),
                "compile_model(path, 'CPU'): precision and threads as OpenVINO picks"),
        Variant("openvino: throughput hint, f32", "raw",
                _ov_runner(onnx_path, {**f32, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 1})),
    ]
    for batch in BATCH_SIZES:
        variants.append(Variant(f"openvino: static batch {batch}, f32", "raw",
                                _ov_runner(onnx_path, f32, static_batch=batch), f"only for batch {batch}"))
    variants += [
        Variant("onnxruntime: library defaults", "raw",
                _ort_runner(_ort_session(onnx_path, threads=None, spinning=None, fixed_batch=None, defaults=True)),
                "InferenceSession(path): threads and spinning as ONNX Runtime picks"),
        Variant("onnxruntime: spinning threads", "raw",
                _ort_runner(_ort_session(onnx_path, threads=threads, spinning=True, fixed_batch=None))),
    ]
    for batch in BATCH_SIZES:
        variants.append(Variant(f"onnxruntime: fixed batch {batch}", "raw",
                                _ort_runner(_ort_session(onnx_path, threads=threads, spinning=False, fixed_batch=batch)),
                                f"only for batch {batch}"))
    return variants, reference


def fixed_size(variant: Variant) -> int | None:
    return int(variant.note.rsplit(" ", 1)[-1]) if variant.note.startswith("only for batch") else None


def applies(variant: Variant, batch: int) -> bool:
    return fixed_size(variant) in (None, batch)


def run_any(variant: Variant, batch: np.ndarray) -> np.ndarray:
    """Logits for ``batch`` from any variant, padding or splitting it for one that takes a fixed batch size."""
    size = fixed_size(variant)
    if size is None or size == len(batch):
        return np.asarray(variant.run(batch))
    if size == 1:
        return np.concatenate([np.asarray(variant.run(batch[i:i + 1])) for i in range(len(batch))])
    padded = np.concatenate([batch] * -(-size // len(batch)))[:size]
    return np.asarray(variant.run(padded))[:len(batch)]


def measure(models: list[str], home: Path, rounds: int, threads: int) -> dict[str, Any]:
    from mixnet_cli.classifier import softmax
    from mixnet_cli.engines.conversion import validation_batch

    results: dict[str, Any] = {}
    for model in models:
        log(f"{model}: building engines...")
        variants, reference = build_variants(model, home, threads)
        check = validation_batch(224, count=2)
        want = softmax(reference.run(check))
        fidelity = {variant.name: float(np.abs(softmax(run_any(variant, check)) - want).max()) for variant in variants}
        samples: dict[str, dict[int, list[float]]] = {v.name: {b: [] for b in BATCH_SIZES} for v in variants}
        rng = np.random.default_rng(0)
        inputs = {b: rng.uniform(-2.1, 2.6, (b, 3, 224, 224)).astype(np.float32) for b in BATCH_SIZES}
        for variant in variants:  # warm-up: first runs at a new shape compile and allocate
            for batch in BATCH_SIZES:
                if applies(variant, batch):
                    variant.run(inputs[batch])
                    variant.run(inputs[batch])
        order = random.Random(1)
        for round_index in range(rounds):
            log(f"{model}: round {round_index + 1}/{rounds}")
            for batch in BATCH_SIZES:
                shuffled = [v for v in variants if applies(v, batch)]
                order.shuffle(shuffled)
                for variant in shuffled:
                    samples[variant.name][batch].append(fastest_ms(lambda: variant.run(inputs[batch]), RUNS_PER_ROUND))
                    if variant.family == "paddle":
                        time.sleep(0.3)  # let paddle's OpenMP threads stop spinning before the next one is timed
        rows = []
        for variant in variants:
            for batch in BATCH_SIZES:
                if samples[variant.name][batch]:
                    rows.append({"engine": variant.name, "batch_size": batch, "note": variant.note,
                                 "max_probability_diff": fidelity[variant.name],
                                 "same_model": fidelity[variant.name] <= FIDELITY,
                                 **{f"{k}_ms": v for k, v in summary(samples[variant.name][batch]).items() if k != "n"},
                                 "samples": len(samples[variant.name][batch])})
        results[model] = rows
        del variants, reference
    return results


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, rounds=15)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args(argv)
    from mixnet_cli.engines.base import physical_cores

    prepare_home(args.home, args.models)
    at_start = machine()
    started = time.time()
    results = measure(args.models, args.home, args.rounds, physical_cores())
    write_json(args.out, {"machine": at_start, "load_average_at_end": list(os.getloadavg()), "rounds": args.rounds, "runs_per_round": RUNS_PER_ROUND,
                          "seconds": time.time() - started, "models": results})
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
