"""Every GPU check of mixnet-cli, in one run (benchmarks/gpu.sh starts it on the GPU machine).

    python benchmarks/gpu_check.py --carry .gpu-check --out "$OUT" [--device gpu] [--repeats 200]

What it does, each step through mixnet's own command line (``python -m mixnet_cli``), as a user runs it:

1. rebuilds each model's ``.pdparams`` from the carried float16 values (``gpu_prepare.py``) and checks the
   state dict's digest, so the reference computed by paddleclas elsewhere applies here;
2. fidelity: ``mixnet classify --device gpu --weights ... --json`` on the carried photos, for S, M and L,
   against PaddleClas's dygraph probabilities: same top-5, every probability within 1e-4;
3. ``auto``: ``mixnet classify -v`` with no ``--device``, which must pick the GPU, saying why;
4. ``mixnet benchmark --device gpu --engine torch`` at batch 1, 4 and 8 for S, M and L, in fp32, tf32, bf16 and
   fp16 (each with its agreement with fp32), and S compiled (``--compile``) within a time limit;
5. writes ``gpu.md`` (the table BENCHMARKS.md takes, next to PaddleClas's V100 TensorRT column), ``results.json``
   and ``log.txt`` into ``--out``.

``--device cpu`` runs the same steps on the CPU (fp32 only; ``--compile-limit 0`` skips the compile): how this
script is tested without a GPU. Results are saved after each step, so a run cut short keeps what it measured.
Exit status 0 when every fidelity check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gpu_prepare import MODELS, state_sha256  # noqa: E402  (beside this script)

TOLERANCE = 1e-4
LOG: list[str] = []


def say(message: str) -> None:
    LOG.append(message)
    print(message, file=sys.stderr, flush=True)


def mixnet(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mixnet_cli", *args]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        say(f"$ mixnet {' '.join(args)}  -> timed out after {timeout:.0f} s")
        return subprocess.CompletedProcess(command, 124, "", f"timed out after {timeout:.0f} s")
    say(f"$ mixnet {' '.join(args)}  -> exit {done.returncode} in {time.perf_counter() - started:.1f} s")
    if done.returncode != 0:
        say(done.stderr.strip()[-2000:])
    return done


def rebuild_weights(carry: Path, work: Path, reference: dict[str, Any]) -> dict[str, Path]:
    from weightgen import save_pdparams

    paths = {}
    for model in MODELS:
        with np.load(carry / f"{model}.npz") as stored:
            state = {name: stored[name].astype(np.float32) for name in stored.files}
        expected = reference["models"][model]["state_sha256"]
        if state_sha256(state) != expected:
            raise SystemExit(f"{model}: the rebuilt state dict is not the one the reference was computed for")
        paths[model] = save_pdparams(state, work / f"{model}.pdparams")
    return paths


def fidelity(weights: dict[str, Path], images: list[Path], reference: dict[str, Any], device: str,
             env: dict[str, str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for model in MODELS:
        done = mixnet("classify", *map(str, images), "--weights", str(weights[model]), "-m", model, "--device",
                      device, "--engine", "torch", "--json", "-k", "5", "-b", "4", "-v", env=env)
        row: dict[str, Any] = {"exit": done.returncode, "engine_line": next(
            (line for line in done.stderr.splitlines() if line.startswith("model ")), "")}
        if done.returncode == 0:
            worst, same_top5 = 0.0, True
            for answer in json.loads(done.stdout):
                expected = reference["models"][model]["answers"][Path(answer["input"]).name]
                ids = [p["class_id"] for p in answer["predictions"]]
                same_top5 &= ids == expected["top5"]
                worst = max([worst] + [abs(p["score"] - expected["probabilities"][p["class_id"]])
                                       for p in answer["predictions"]])
            row.update(max_abs_probability_diff=worst, same_top5=same_top5, images=len(images),
                       passed=same_top5 and worst <= TOLERANCE)
        else:
            row["passed"] = False
        say(f"fidelity {model} on {device}: {row}")
        results[model] = row
    return results


def benchmarks(weights: dict[str, Path], device: str, repeats: int, env: dict[str, str], compile_limit: float,
               rows: list[dict[str, Any]], save: Any) -> None:
    """Append the benchmark rows to ``rows``, saving after each command."""
    precisions = ["fp32", "tf32", "bf16", "fp16"] if device != "cpu" else ["fp32"]
    common = ["-b", "1", "-b", "4", "-b", "8", "--warmup", str(max(3, repeats // 10)), "--repeats", str(repeats),
              "--device", device, "--engine", "torch", "--json"]
    for model in MODELS:
        args = ["benchmark", "--weights", str(weights[model]), "-m", model, *common]
        for precision in precisions:
            args += ["--precision", precision]
        done = mixnet(*args, env=env)
        if done.returncode == 0:
            rows += json.loads(done.stdout)
        save()
    if compile_limit <= 0:
        return
    # torch.compile: S only, fp32 and fp16, within a time limit (Inductor compiles each batch size).
    done = mixnet("benchmark", "--weights", str(weights["MixNet_S"]), "-m", "MixNet_S", *common, "--compile",
                  "--precision", "fp32", "--precision", "fp16", env=env, timeout=compile_limit)
    if done.returncode == 0:
        rows += [row for row in json.loads(done.stdout) if row["compiled"]]


def machine(device: str) -> dict[str, Any]:
    facts: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["cuda"] = torch.version.cuda
        facts["cudnn"] = torch.backends.cudnn.version()
        if device != "cpu" and torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        facts["torch"] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        facts["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        facts["nvidia_smi"] = None
    return facts


def markdown(facts: dict[str, Any], fidelity_rows: dict[str, Any], rows: list[dict[str, Any]], device: str) -> str:
    lines = [f"## GPU: {facts.get('gpu') or device}", "",
             f"Machine: {facts.get('nvidia_smi') or 'no nvidia-smi'}; Python {facts['python']}, torch "
             f"{facts.get('torch')}, CUDA {facts.get('cuda')}, cuDNN {facts.get('cudnn')}. Engine: "
             f"{rows[0]['detail'] if rows else 'torch'}. Milliseconds per batch, median, host-to-device copy and "
             "logits back included (`mixnet benchmark`).", "",
             f"Fidelity (`mixnet classify --device {device} --weights ...` against PaddleClas's dygraph pipeline):", ""]
    for model, row in fidelity_rows.items():
        lines.append(f"- {model}: {'passed' if row.get('passed') else 'FAILED'}, same top-5: {row.get('same_top5')}, "
                     f"largest probability difference {row.get('max_abs_probability_diff', float('nan')):.2e} "
                     f"on {row.get('images', 0)} images")
    lines += ["", "| model | precision | batch | median ms | p90 ms | images/s | V100 TensorRT fp32 ms | "
              "max prob. diff vs fp32 | top-1 agreement |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        precision = row["precision"] + (" compiled" if row["compiled"] else "")
        diff = row["max_prob_diff_vs_fp32"]
        agree = row["top1_agreement_vs_fp32"]
        lines.append(f"| {row['model']} | {precision} | {row['batch_size']} | {row['median_ms']:.3f} | "
                     f"{row['p90_ms']:.3f} | {row['images_per_s']:.0f} | {row['paddleclas_v100_trt_ms'] or ''} | "
                     f"{'' if diff is None else f'{diff:.1e}'} | {'' if agree is None else f'{agree:.2f}'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carry", type=Path, default=ROOT / ".gpu-check")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "gpu-results"))
    parser.add_argument("--device", default="gpu")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--compile-limit", type=float, default=240.0,
                        help="seconds for the torch.compile run (0: skip it)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out.parent / (args.out.name + "-work") if os.environ.get("OUT") is None else Path("/tmp/mixnet-gpu")
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MIXNET_HOME": str(work / "home"), "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    reference = json.loads((args.carry / "reference.json").read_text(encoding="utf-8"))
    images = [args.carry / "images" / name for name in reference["images"].values()]
    facts = machine(args.device)
    say(f"machine: {facts}")
    weights = rebuild_weights(args.carry, work, reference)

    results: dict[str, Any] = {"machine": facts, "fidelity": {}, "auto": None, "benchmark": []}

    def save() -> None:
        """After each step: a run cut short by its time limit still leaves what it measured."""
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        (args.out / "gpu.md").write_text(markdown(facts, results["fidelity"], results["benchmark"], args.device),
                                         encoding="utf-8")
        (args.out / "log.txt").write_text("\n".join(LOG) + "\n", encoding="utf-8")

    fidelity_rows = results["fidelity"] = fidelity(weights, images, reference, args.device, env)
    save()
    auto = mixnet("classify", str(images[0]), "--weights", str(weights["MixNet_S"]), "-v", "--json", env=env)
    results["auto"] = next((line for line in auto.stderr.splitlines() if line.startswith("model ")), auto.stderr.strip())
    say(f"auto: {results['auto']}")
    save()
    benchmarks(weights, args.device, args.repeats, env, args.compile_limit, results["benchmark"], save)
    save()
    passed = all(row.get("passed") for row in fidelity_rows.values())
    say(f"fidelity {'passed' if passed else 'FAILED'}; results in {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
