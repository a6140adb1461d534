"""Goals 2 and 4: cold start of `mixnet classify one.jpg` (weights and converted model cached) against
`python -c "import paddle"`, `mixnet --help`, the first classify of a model whose weights are cached but not yet
converted (mixnet builds the network from them), and the peak memory of classifying one image, interleaved.

Every command is a fresh process, as a user runs it; bytecode is cached as in an installed package (the
first, untimed round writes it). Peak memory is the child's maximum resident set (``wait4``).

    python benchmarks/coldstart.py --home /tmp/mixnet-bench --out coldstart.json [--rounds 9]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SAMPLES, arguments, clean_env, log, machine, mixnet_executable, prepare_home, run_process, summary, write_json


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


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, rounds=9)
    parser.add_argument("--model", default="MixNet_S")
    args = parser.parse_args(argv)
    prepare_home(args.home, [args.model])
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
        "ratio_first_use_to_warm": first / default,
    })
    log(f"wrote {args.out}: classify {default:.3f} s, import paddle {paddle:.3f} s, ratio {default / paddle:.2f}; "
        f"first use {first:.3f} s ({first / default:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
