"""Prepare what the GPU check (benchmarks/gpu.sh) carries to a GPU machine that has no paddle and no network.

Run here, in an environment with the [paddle] extra (paddleclas is the reference):

    python benchmarks/gpu_prepare.py --out .gpu-check

It writes, into ``--out`` (about 35 MB, under the 64 MiB a run may carry):

* ``MixNet_{S,M,L}.npz``: test weights made by the tests' recipe (``tests/weightgen.py``), every value rounded to
  float16 so that they travel at half size and are rebuilt bit for bit as the float32 ``.pdparams`` file there;
* ``images/``: generated photos of several file kinds (``tests/imagegen.py``);
* ``reference.json``: PaddleClas's own pipeline on them (its cv2 decoding and operators, its dygraph network,
  softmax): the probabilities every GPU answer must match to 1e-4, with the sha256 of each state dict;
* ``wheels/``: the pure-Python packages mixnet needs that the GPU machine lacks (``platformdirs``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

MODELS = ("MixNet_S", "MixNet_M", "MixNet_L")
IMAGE_KINDS = ("rgb_jpeg", "cmyk_jpeg", "exif6_jpeg", "grey16_png", "palette_png", "rgba_png")
# The GPU machine's image has every other dependency of the core (click, requests, tqdm, filelock, onnx,
# onnxruntime, opencv, pillow, numpy); OpenVINO is not needed there (no engine of the check imports it).
MISSING_THERE = ("platformdirs",)


def state_sha256(state: dict[str, np.ndarray]) -> str:
    """A digest of a state dict's names, shapes and float32 values (not of a file: pickles differ by numpy)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = np.ascontiguousarray(state[name], dtype=np.float32)
        digest.update(name.encode() + repr(value.shape).encode() + value.tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-check")
    args = parser.parse_args()
    from imagegen import write_test_images
    from paddleclas_reference import PaddleClasReference, paddleclas_decode, paddleclas_transform
    from weightgen import calibrated_state, save_pdparams

    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    every = write_test_images(out / "all-images")
    images = {}
    for kind in IMAGE_KINDS:
        target = out / "images" / every[kind].name
        shutil.copyfile(every[kind], target)
        images[kind] = target
    shutil.rmtree(out / "all-images")

    reference: dict[str, object] = {"images": {kind: path.name for kind, path in images.items()}, "models": {}}
    for model in MODELS:
        state = {name: value.astype(np.float16).astype(np.float32) for name, value in calibrated_state(model).items()}
        np.savez(out / f"{model}.npz", **{name: value.astype(np.float16) for name, value in state.items()})
        weights = save_pdparams(state, out / f"{model}.pdparams")
        network = PaddleClasReference(model, weights)
        answers = {}
        for kind, path in images.items():
            ids, probabilities = network.answer(paddleclas_transform(paddleclas_decode(path)))
            answers[path.name] = {"top5": [int(i) for i in ids], "probabilities": [float(p) for p in probabilities]}
        reference["models"][model] = {"state_sha256": state_sha256(state), "answers": answers}  # type: ignore[index]
        weights.unlink()
        print(f"{model}: reference on {len(images)} images", file=sys.stderr)
    (out / "reference.json").write_text(json.dumps(reference) + "\n", encoding="utf-8")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "-d", str(out / "wheels"), *MISSING_THERE], check=True)
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
