"""Weights whose logits look like a trained network's on real photos: for judging a lower precision (bf16).

The tests' calibrated weights (``tests/weightgen.py``) give confident, varied answers on generated pictures, but on
real photos their logits reach the hundreds, and any rounding then moves answers far more than it would in a
trained network: a precision judged on them looks worse than it is. Here the calibrated backbone is kept and the
classifier is fitted again on the real photos: a random projection of their standardised pooled features, scaled so
that the median top-1 probability over the photos is ``target`` (0.65 by default; trained MixNets give 0.5-0.8 on
ImageNet photos), with the features' leading principal directions (where a few photos are outliers) projected out,
which puts the logits in a trained network's range (a few tens).

    python benchmarks/realistic_weights.py --model MixNet_S --out MixNet_S_pretrained.pdparams [--images DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from _common import ROOT, SAMPLES, log, sample_images

sys.path.insert(0, str(ROOT / "tests"))
TARGET_MEDIAN_TOP1 = 0.65
BULK_STD = 2.5  # the spread of a trained classifier's logits over the classes it does not answer
RIDGE = 0.1  # the ridge fit's regulariser, as a fraction of the features' mean squared norm


def _class_of(path: Path, rng: np.random.Generator, classes: int) -> int:
    """The ImageNet class of a photo named by its synset (``n01440764_tench.JPEG``), else a random class."""
    from mixnet_cli.images.labels import imagenet_synsets

    synset = path.name.split("_", 1)[0]
    synsets = imagenet_synsets()
    return synsets.index(synset) if synset in synsets else int(rng.integers(classes))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def photo_batch(model: str, photos: Sequence[Path]) -> np.ndarray:
    """The photos preprocessed exactly as mixnet does (``N x 3 x 224 x 224`` float32)."""
    from mixnet_cli.base.manifest import resolve_model
    from mixnet_cli.images.preprocess import load_and_transform

    spec = resolve_model(model)
    return np.stack([load_and_transform(path, spec.preprocessing, str(path)) for path in photos])


def realistic_state(model: str, photos: Sequence[Path], *, seed: int = 0,
                    target: float = TARGET_MEDIAN_TOP1) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The parameters (calibrated backbone, classifier fitted on ``photos``) and what they give on the photos:
    median top-1 probability, smallest and largest logit."""
    import onnxruntime
    from weightgen import calibrated_state

    from mixnet_cli.network.architecture import architecture_of
    from mixnet_cli.network.onnx_graph import build_onnx

    architecture = architecture_of(model)
    state = calibrated_state(model, seed)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(build_onnx(architecture, state, features=True).SerializeToString(),
                                           options, providers=["CPUExecutionProvider"])
    batch = photo_batch(model, photos)
    features = np.concatenate([session.run(["features"], {"x": batch[i:i + 16]})[0]
                               for i in range(0, len(batch), 16)]).astype(np.float64)
    mean = features.mean(axis=0)
    std = np.maximum(features.std(axis=0), np.median(features.std(axis=0)))  # as weightgen: no channel blows up
    standardised = (features - mean) / std
    # The bulk of the logits: a random projection, spread like a trained network's non-answers (std ~BULK_STD).
    # A few photos lie far out along the leading principal directions of the calibrated backbone's features (a
    # tenth of the photos have 3-10x the typical distance from the mean): projected out, no photo's logits reach
    # the hundreds.
    rng = np.random.default_rng(seed + 1)
    directions = rng.standard_normal((features.shape[1], architecture.num_classes))
    principal = np.linalg.svd(standardised, full_matrices=False)[2][:max(1, len(photos) // 10)]
    directions -= principal.T @ (principal @ directions)
    bulk = standardised @ directions
    directions *= BULK_STD / bulk.std()
    bulk *= BULK_STD / bulk.std()
    # The answer: a ridge fit of each photo's own class (from its file name's synset; a random class otherwise),
    # so one class stands out the way a trained network's answer does.
    classes = np.array([_class_of(path, rng, architecture.num_classes) for path in photos])
    gram = standardised @ standardised.T
    ridge = RIDGE * np.trace(gram) / len(gram)
    targets = np.zeros((len(photos), architecture.num_classes))
    targets[np.arange(len(photos)), classes] = 1.0
    answer = standardised.T @ np.linalg.solve(gram + ridge * np.eye(len(gram)), targets)  # features x classes
    fitted = standardised @ answer

    def median_top1(gain: float) -> float:
        return float(np.median(_softmax(bulk + gain * fitted).max(axis=1)))

    low, high = 0.01, 1000.0
    for _ in range(60):  # the median top-1 probability grows with the answer's gain: bisect for the target
        middle = math.sqrt(low * high)
        low, high = (middle, high) if median_top1(middle) < target else (low, middle)
    gain = math.sqrt(low * high)
    weight = directions + gain * answer  # on the standardised features; folded into the Linear layer ([in, out])
    state[architecture.classifier_weight] = (weight / std[:, None]).astype(np.float32)
    state[architecture.classifier_bias] = (-(mean / std) @ weight).astype(np.float32)
    logits = bulk + gain * fitted
    return state, {"median_top1_probability": median_top1(gain), "min_logit": float(logits.min()),
                   "max_logit": float(logits.max()), "gain": gain, "photos": len(photos)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="MixNet_S")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=SAMPLES)
    parser.add_argument("--target", type=float, default=TARGET_MEDIAN_TOP1)
    args = parser.parse_args(argv)
    from weightgen import save_pdparams

    state, facts = realistic_state(args.model, sample_images(directory=args.images), target=args.target)
    save_pdparams(state, args.out)
    log(f"{args.out}: {facts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
