"""Opt-in bf16 (``--precision bf16``, OpenVINO on a CPU with bf16 arithmetic) against fp32: answers and speed.

Answers: on real photos, with weights whose logits look like a trained network's (``realistic_weights.py``), the
share of photos whose top-1 label and whose top-5 set are fp32's (ONNX Runtime, the reference), and the largest
probability difference. Speed: milliseconds per forward pass at batch 1 and 8 of bf16 and of both fp32 engines,
interleaved rounds (engines in a new random order each, the fastest of 3 back-to-back runs per sample), medians;
the throughput ratio is against the faster fp32 engine.

    python benchmarks/bf16.py --home /tmp/mixnet-bf16 --out bf16.json [--rounds 9] [--models MixNet_S]
"""

from __future__ import annotations

import os
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from _common import MODELS, SAMPLES, arguments, fastest_ms, log, machine, sample_images, write_json

BATCH_SIZES = (1, 8)


def _agreement(got: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    from mixnet_cli.images.postprocess import softmax

    p, q = softmax(got.astype(np.float64)), softmax(expected.astype(np.float64))
    top5 = lambda a: np.sort(np.argsort(-a, axis=1)[:, :5], axis=1)  # noqa: E731
    return {"top1_agreement": float(np.mean(p.argmax(1) == q.argmax(1))),
            "top5_set_agreement": float(np.mean(np.all(top5(p) == top5(q), axis=1))),
            "max_abs_probability_diff": float(np.abs(p - q).max()),
            "median_abs_top1_probability_diff": float(np.median(np.abs(p.max(1) - q.max(1))))}


def measure(models: list[str], home: Path, rounds: int, photos: list[Path]) -> dict[str, Any]:
    from realistic_weights import photo_batch, realistic_state
    from weightgen import save_pdparams

    from mixnet_cli import Classifier
    from mixnet_cli.base.manifest import resolve_model

    results: dict[str, Any] = {}
    for model in models:
        spec = resolve_model(model)
        target = home / "weights" / spec.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        state, facts = realistic_state(model, photos)
        save_pdparams(state, target)
        # New weights: the record of any earlier ones beside them would not match (a download would follow).
        Path(f"{target}.json").unlink(missing_ok=True)
        log(f"{model}: realistic weights {facts}")
        engines = {
            "fp32 onnxruntime": Classifier(model, device="cpu", engine="onnxruntime").engine,
            "fp32 openvino": Classifier(model, device="cpu", engine="openvino").engine,
            "bf16 openvino": Classifier(model, device="cpu", precision="bf16").engine,
        }
        batch = photo_batch(model, photos)
        logits = {name: np.concatenate([engine.run(batch[i:i + 8]) for i in range(0, len(batch), 8)])
                  for name, engine in engines.items()}
        reference = logits["fp32 onnxruntime"]
        answers = {name: _agreement(value, reference) for name, value in logits.items() if name != "fp32 onnxruntime"}
        samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCH_SIZES} for name in engines}
        for size in BATCH_SIZES:
            data = np.ascontiguousarray(batch[:size])
            for engine in engines.values():
                engine.run(data)
            for _ in range(rounds):
                for name in random.sample(list(engines), len(engines)):
                    samples[name][size].append(fastest_ms(lambda: engines[name].run(data), 3))
        speed = {name: {str(b): statistics.median(v) for b, v in by_size.items()} for name, by_size in samples.items()}
        best_fp32 = {str(b): min(speed["fp32 onnxruntime"][str(b)], speed["fp32 openvino"][str(b)]) for b in BATCH_SIZES}
        results[model] = {
            "weights": facts,
            "answers_vs_fp32_onnxruntime": answers,
            "median_ms": speed,
            "bf16_throughput_vs_best_fp32": {b: best_fp32[b] / speed["bf16 openvino"][b] for b in best_fp32},
            "detail": {name: engine.detail for name, engine in engines.items()},
        }
        log(f"{model}: {results[model]['answers_vs_fp32_onnxruntime']['bf16 openvino']}; speed {speed}; "
            f"bf16 throughput vs best fp32 {results[model]['bf16_throughput_vs_best_fp32']}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, rounds=9)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--images", type=Path, default=SAMPLES)
    args = parser.parse_args(argv)
    os.environ["MIXNET_HOME"] = str(args.home)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from mixnet_cli.engines.choice import native_bf16

    if native_bf16() is None:
        raise SystemExit("this CPU has no bf16 arithmetic (avx512_bf16 or AMX): nothing to measure")
    about = machine()
    results = measure(args.models, args.home, args.rounds, sample_images(directory=args.images))
    write_json(args.out, {"machine": about, "machine_after": machine(), "rounds": args.rounds, "models": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
