"""What the benchmark scripts share: a cache with random weights in the real format, timing, machine facts.

Real weights cannot be downloaded everywhere, and speed does not depend on the values of the weights: each
model's weights, made by the tests' recipe in the real ``.pdparams`` format (``tests/weightgen.py``), are installed into a
temporary ``MIXNET_HOME`` and converted by mixnet itself (ONNX; Paddle Inference with the [paddle] extra) before
anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("MixNet_S", "MixNet_M", "MixNet_L")
# Real ImageNet photos when a folder of them sits beside the checkout (../shared/data/imagenet-samples), else
# MIXNET_BENCH_IMAGES; without either, pass --images DIR to the benchmarks that need photos.
SAMPLES = Path(os.environ.get("MIXNET_BENCH_IMAGES") or ROOT.parent / "shared" / "data" / "imagenet-samples")


def arguments(doc: str, rounds: int) -> argparse.ArgumentParser:
    """The options every benchmark script takes (--home, --out, --rounds); each adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="MIXNET_HOME to use (prepared if empty)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=rounds)
    return parser


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mixnet_executable() -> Path:
    """The ``mixnet`` console script of this interpreter's environment (what users run)."""
    candidate = Path(sys.executable).parent / "mixnet"
    if not candidate.exists():
        raise SystemExit(f"{candidate} not found: install the project first (pip install -e .)")
    return candidate


def clean_env(home: Path, pycache: Path) -> dict[str, str]:
    """The environment of a user's shell: MIXNET_HOME set, bytecode cached (as an installed package has it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXNET_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env["MIXNET_HOME"] = str(home)
    return env


def prepare_home(home: Path, models: Sequence[str] = MODELS, formats: Sequence[str] | None = None) -> Path:
    """Random weights for ``models`` in ``home`` (the real file format), converted for each engine once
    (ONNX; Paddle Inference too where the [paddle] extra is installed)."""
    weights_dir = home / "weights"
    weights_dir.mkdir(parents=True, exist_ok=True)
    code = f"""
import os, sys, warnings
warnings.filterwarnings("ignore")
os.environ["MIXNET_HOME"] = {str(home)!r}
sys.path.insert(0, {str(ROOT / "tests")!r})
from weightgen import calibrated_state, save_pdparams
from mixnet_cli import Classifier
from mixnet_cli.base.third_party import paddle_missing
from mixnet_cli.base.manifest import resolve_model
formats = {list(formats) if formats is not None else None!r} or (["onnxruntime"] + (["paddle"] if paddle_missing() is None else []))
for index, name in enumerate({list(models)!r}):
    spec = resolve_model(name)
    target = os.path.join({str(weights_dir)!r}, spec.filename)
    if not os.path.exists(target):
        # The tests' calibrated weights: answers spread like trained ones, so comparing probabilities between
        # engines means something, and no layer's values explode (speed does not depend on them).
        save_pdparams(calibrated_state(name, seed=index), target)
    for engine in formats:
        Classifier(name, device="cpu", engine=engine)
"""
    log(f"preparing {', '.join(models)} in {home} (random weights, converted once)...")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT))
    return home


def sample_images(limit: int = 200, directory: Path = SAMPLES) -> list[Path]:
    images = sorted(p for p in directory.glob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[:limit]
    if not images:
        raise SystemExit(f"no images in {directory}: pass --images DIR")
    return images


def summary(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    deciles = statistics.quantiles(ordered, n=10, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 9
    return {
        "median": statistics.median(ordered),
        "p10": deciles[0],
        "p90": deciles[-1],
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


def fastest_ms(function: Callable[[], Any], runs: int) -> float:
    """The fastest of ``runs`` back-to-back calls, in milliseconds: a burst of load from another process then
    slows one run, not the sample."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000.0)
    return min(times)


def timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def run_process(command: Sequence[str], env: dict[str, str], stdout: Any = subprocess.DEVNULL) -> tuple[float, int, int]:
    """Wall seconds, peak resident memory (KiB) and exit status of one run of ``command``."""
    start = time.perf_counter()
    process = subprocess.Popen(list(command), env=env, stdout=stdout, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.stderr is not None:
        error = process.stderr.read()
        process.stderr.close()
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {error.decode(errors='replace')[-2000:]}")
    return elapsed, int(usage.ru_maxrss), process.returncode


def machine() -> dict[str, Any]:
    """CPU, cores, memory, load and the versions that matter, for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    from mixnet_cli.engines.base import physical_cores

    versions = {}
    for name in ("mixnet-cli", "openvino", "onnxruntime", "onnxruntime-gpu", "paddlepaddle", "paddlepaddle-gpu", "paddleclas",
                 "onnx", "numpy", "opencv-python", "opencv-python-headless", "pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f" {f}" in text)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "physical_cores_available": physical_cores(),
        "memory": memory,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Other processes share the machine: the load average (1, 5, 15 minutes) when this was called.
        "load_average": list(os.getloadavg()),
        "versions": versions,
    }


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
