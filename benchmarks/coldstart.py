"""Goals 2 and 4: cold start of `mixnet classify one.jpg` (weights and converted model cached) against
`python -c "import paddle"`, `mixnet --help`, the first classify of a model whose weights are cached but not yet
converted (mixnet builds the network from them), and the peak memory of classifying one image, interleaved.

Every command is a fresh process, as a user runs it; bytecode is cached as in an installed package (the
first, untimed round writes it). Peak memory is the child's maximum resident set (``wait4``).

``--baseline REV`` also runs the same one-image calls with the code of git revision REV (extracted with ``git
archive`` into a temporary folder and put first on ``PYTHONPATH``; same interpreter, same cache), interleaved
with this checkout's round by round, for each of ``--compare-models``: ``mixnet classify one.jpg``, ``mixnet
--help``, and ``mixnet classify one.jpg --server URL`` against one warm ``mixnet serve`` (this checkout's, with
the [serve] extra); it reports each median and the ratio this checkout / REV. ``--compare-only`` runs just that.

    python benchmarks/coldstart.py --home /tmp/mixnet-bench --out coldstart.json [--rounds 9]
    python benchmarks/coldstart.py --home /tmp/mixnet-bench --out cold.json --baseline 6d11263 --compare-only
    python benchmarks/coldstart.py ... --baseline 6d11263 --also f347d41 --compare-only   (three variants)
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from _common import (ROOT, SAMPLES, arguments, clean_env, log, machine, mixnet_executable, prepare_home, run_process,
                     summary, write_json)


def one_image(directory: Path) -> Path:
    candidates = sorted(SAMPLES.glob("*.JPEG"))
    if candidates:
        return candidates[0]
    from PIL import Image

    import numpy as np

    path = directory / "one.jpg"
    pixels = (np.random.default_rng(0).random((375, 500, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(path, quality=90)
    return path


def extract_revision(revision: str, into: Path) -> Path:
    """The package as it was at git ``revision``, extracted under ``into``; returns the folder to put on
    PYTHONPATH."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", revision, "mixnet_cli"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def warm_service(mixnet: str, env: dict[str, str], models: list[str]) -> Iterator[str | None]:
    """A ``mixnet serve`` of ``models`` on 127.0.0.1, ready (None without the [serve] extra); stopped after."""
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in ("starlette", "uvicorn")):
        yield None
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([mixnet, "serve", "--port", str(port), *[x for m in models for x in ("--model", m)]],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mixnet serve did not become ready at {url}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


# What no code of ours can go below: the imports a local one-image call needs, an ONNX Runtime session from the
# cached optimised graph, one decode and one forward pass, and an exit without teardown (the same for both
# variants: it runs none of mixnet's code).
FLOOR = """
import glob, os
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np, cv2, PIL.Image, click, onnxruntime as ort
found = sorted(glob.glob({home!r} + "/onnx/*/onnxruntime-*/MixNet_S.ort")) or sorted(glob.glob({home!r} + "/onnx/*/MixNet_S.onnx"))
options = ort.SessionOptions()
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(found[0], options, providers=["CPUExecutionProvider"])
image = cv2.imdecode(np.fromfile({image!r}, np.uint8), cv2.IMREAD_COLOR)
x = cv2.resize(image, (224, 224)).astype(np.float32).transpose(2, 0, 1)[None] / 255
session.run(None, {{session.get_inputs()[0].name: x}})
os._exit(0)
"""


def timed_run(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the child's) of one run of ``command``; CPU time moves less
    than wall time when other processes share the machine."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    error = process.stderr.read() if process.stderr else b""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {error.decode(errors='replace')[-2000:]}")
    return elapsed, usage.ru_utime + usage.ru_stime


def compare_with_baseline(args: object, mixnet: str, image: str, env: dict[str, str], scratch: Path) -> dict:
    """The one-image calls of this checkout and of ``args.baseline``, interleaved: medians and ratios."""
    old_root = extract_revision(args.baseline, scratch / "baseline")
    roots = {"before": old_root, "after": ROOT}
    for revision in args.also:  # more revisions, each a variant of its own (ratios to the baseline too)
        roots[revision] = extract_revision(revision, scratch / f"also-{revision}")
    # Each variant its own copy of the cache: code whose converted-model record differs (another RECORD_VERSION)
    # replaces the other's conversion, and in one shared cache every run would convert again.
    variants = {}
    for variant, root in roots.items():
        home = scratch / f"home-{variant}"
        shutil.copytree(args.home, home, symlinks=True)
        variants[variant] = {**env, "PYTHONPATH": str(root), "MIXNET_HOME": str(home)}
    with warm_service(mixnet, variants["after"], args.compare_models) as server:
        commands: dict[str, list[str]] = {"mixnet --help": [mixnet, "--help"],
                                          "the libraries' floor (S)": [sys.executable, "-c", FLOOR.format(
                                              home=str(args.home), image=image)]}
        for model in args.compare_models:
            commands[f"mixnet classify one.jpg --model {model}"] = [mixnet, "classify", image, "--model", model]
            # The default engine is the CPU's (OpenVINO on AVX-512): ONNX Runtime's start, for the same call.
            commands[f"mixnet classify one.jpg --model {model} --engine onnxruntime"] = [
                mixnet, "classify", image, "--model", model, "--engine", "onnxruntime"]
        if server is not None:
            commands["mixnet classify one.jpg --server URL (warm local service)"] = [
                mixnet, "classify", image, "--server", server]
        for command in commands.values():  # bytecode, disk cache, the cache's stat records
            for variant_env in variants.values():
                for _ in range(2):
                    timed_run(command, variant_env)
        wall: dict[str, dict[str, list[float]]] = {name: {v: [] for v in variants} for name in commands}
        cpu: dict[str, dict[str, list[float]]] = {name: {v: [] for v in variants} for name in commands}
        for index in range(args.rounds):
            log(f"cold start against {args.baseline}: round {index + 1}/{args.rounds}")
            for name, command in commands.items():
                order = list(variants) if index % 2 == 0 else list(reversed(list(variants)))
                for variant in order:
                    seconds, cpu_seconds = timed_run(command, variants[variant])
                    wall[name][variant].append(seconds)
                    cpu[name][variant].append(cpu_seconds)
    rows = {}
    for name in commands:
        before, after = summary(wall[name]["before"]), summary(wall[name]["after"])
        cpu_before, cpu_after = summary(cpu[name]["before"]), summary(cpu[name]["after"])
        rows[name] = {"before_s": before, "after_s": after, "ratio": after["median"] / before["median"],
                      "cpu_before_s": cpu_before, "cpu_after_s": cpu_after,
                      "cpu_ratio": cpu_after["median"] / cpu_before["median"]}
        for revision in args.also:
            also = summary(wall[name][revision])
            rows[name][revision] = {"s": also, "ratio_to_baseline": also["median"] / before["median"],
                                    "cpu_s": summary(cpu[name][revision])}
            log(f"  {revision}: {also['median']:.3f} s ({also['median'] / before['median']:.2f}x the baseline)")
        log(f"{name}: {before['median']:.3f} s -> {after['median']:.3f} s ({rows[name]['ratio']:.2f}x); CPU "
            f"{cpu_before['median']:.3f} s -> {cpu_after['median']:.3f} s ({rows[name]['cpu_ratio']:.2f}x)")
    return {"baseline": args.baseline, "also": args.also, "rounds": args.rounds, "commands": rows}


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, rounds=9)
    parser.add_argument("--model", default="MixNet_S")
    parser.add_argument("--baseline", metavar="REV", help="also time the code of this git revision, interleaved")
    parser.add_argument("--also", nargs="*", default=[], metavar="REV",
                        help="with --baseline: more revisions timed in the same rounds")
    parser.add_argument("--compare-models", nargs="+", default=["MixNet_S", "MixNet_L"])
    parser.add_argument("--compare-only", action="store_true", help="with --baseline: only the comparison")
    args = parser.parse_args(argv)
    prepare_home(args.home, sorted({args.model, *(args.compare_models if args.baseline else [])}))
    if args.baseline and args.compare_only:
        mixnet = str(mixnet_executable())
        with tempfile.TemporaryDirectory(prefix="mixnet-bench-") as scratch:
            image = str(one_image(Path(scratch)))
            env = clean_env(args.home, Path(scratch) / "pycache")
            at_start = machine()
            compared = compare_with_baseline(args, mixnet, image, env, Path(scratch))
        write_json(args.out, {"machine": at_start, "load_average_at_end": list(os.getloadavg()), "image": image,
                              "baseline": compared})
        return 0
    mixnet = str(mixnet_executable())
    with tempfile.TemporaryDirectory(prefix="mixnet-bench-") as scratch:
        image = str(one_image(Path(scratch)))
        env = clean_env(args.home, Path(scratch) / "pycache")
        commands = {
            "mixnet classify one.jpg": [mixnet, "classify", image, "--model", args.model],
            "mixnet classify one.jpg --engine onnxruntime": [mixnet, "classify", image, "--model", args.model,
                                                             "--engine", "onnxruntime"],
            'python -c "import paddle"': [sys.executable, "-c", "import paddle"],
            "mixnet --help": [mixnet, "--help"],
            'python -c "pass"': [sys.executable, "-c", "pass"],
        }
        occasional = {  # slow: a few runs, for the record
            "mixnet classify one.jpg --engine dygraph": [mixnet, "classify", image, "--model", args.model,
                                                         "--engine", "dygraph"],
        }
        have_paddle = subprocess.run([sys.executable, "-c", "import paddle"], capture_output=True).returncode == 0
        if not have_paddle:
            del commands['python -c "import paddle"'], occasional["mixnet classify one.jpg --engine dygraph"]
        for command in list(commands.values()) + list(occasional.values()):  # writes bytecode, warms the disk cache
            run_process(command, env)
        first_use = "mixnet classify one.jpg, weights cached, first use (builds the network)"
        weights = next((args.home / "weights").glob(f"{args.model}_*.pdparams"))
        occasional[first_use] = [mixnet, "classify", image, "--model", args.model]
        wall: dict[str, list[float]] = {name: [] for name in list(commands) + list(occasional)}
        rss: dict[str, list[int]] = {name: [] for name in wall}
        at_start = machine()
        started = time.time()
        for index in range(args.rounds):
            log(f"cold start: round {index + 1}/{args.rounds}")
            chosen = dict(commands)
            if index < 5:
                chosen.update(occasional)
            for name, command in chosen.items():
                run_env = env
                if name == first_use:  # a cache holding only the weights, each round
                    fresh = Path(scratch) / f"first-{index}"
                    (fresh / "weights").mkdir(parents=True)
                    # The weights as the cache holds them after `mixnet download`: the file and its record.
                    shutil.copy2(weights, fresh / "weights" / weights.name)
                    shutil.copy2(weights.with_name(weights.name + ".json"), fresh / "weights" / (weights.name + ".json"))
                    run_env = {**env, "MIXNET_HOME": str(fresh)}
                seconds, peak_kib, _ = run_process(command, run_env)
                wall[name].append(seconds)
                rss[name].append(peak_kib)
        compared = compare_with_baseline(args, mixnet, image, env, Path(scratch)) if args.baseline else None
    results = {
        name: {"wall_s": summary(wall[name]), "peak_rss_mib": summary([k / 1024 for k in rss[name]])}
        for name in wall
    }
    default = results["mixnet classify one.jpg"]["wall_s"]["median"]
    paddle = results['python -c "import paddle"']["wall_s"]["median"] if have_paddle else float("nan")
    first = results[first_use]["wall_s"]["median"]
    write_json(args.out, {
        "machine": at_start, "load_average_at_end": list(os.getloadavg()), "rounds": args.rounds, "seconds": time.time() - started, "image": image,
        "model": args.model, "commands": results, "ratio_classify_to_import_paddle": default / paddle,
        "ratio_first_use_to_warm": first / default, **({"baseline": compared} if compared else {}),
    })
    log(f"wrote {args.out}: classify {default:.3f} s, import paddle {paddle:.3f} s, ratio {default / paddle:.2f}; "
        f"first use {first:.3f} s ({first / default:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
