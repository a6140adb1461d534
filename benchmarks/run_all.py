"""Measure every goal in one run on this machine and write BENCHMARKS.md.

    python benchmarks/run_all.py [--quick] [--keep DIR] [--installs]

Makes a temporary MIXNET_HOME with random-initialised weights for S, M and L (the real file format; nothing
is downloaded), lets mixnet convert them once, then runs forward.py, coldstart.py, bulk.py, graph_forms.py (its
markdown kept as graph_forms.md) and, with the [serve] extra, serve.py, one after the other, each in its own
process, and renders their results into BENCHMARKS.md (raw results under --keep). Takes about 25 minutes on 2 cores; --quick runs fewer rounds and
only MixNet_S, for a smoke test of the scripts. --installs also runs installs.py (cold installs of the project
into fresh venvs on Python 3.11, 3.12 and 3.13: needs the network and takes several minutes more).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _serve_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("starlette", "uvicorn", "prometheus_client"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, MixNet_S only")
    parser.add_argument("--keep", type=Path, help="keep the JSON results in this directory")
    parser.add_argument("--out", type=Path, default=HERE.parent / "BENCHMARKS.md")
    parser.add_argument("--installs", action="store_true",
                        help="also time cold installs per Python (installs.py; needs the network, minutes)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mixnet-bench-") as scratch:
        home = Path(scratch) / "home"
        results = args.keep or Path(scratch) / "results"
        results.mkdir(parents=True, exist_ok=True)
        models = ["MixNet_S"] if args.quick else ["MixNet_S", "MixNet_M", "MixNet_L"]
        forward_rounds, cold_rounds, bulk_rounds = ("2", "2", "1") if args.quick else ("15", "9", "5")
        # Each step: the script and its arguments, and the file its stdout goes to (None: the terminal).
        steps: list[tuple[list[str], Path | None]] = [
            (["forward.py", "--home", str(home), "--out", str(results / "forward.json"), "--rounds", forward_rounds,
              "--models", *models], None),
            (["coldstart.py", "--home", str(home), "--out", str(results / "coldstart.json"), "--rounds", cold_rounds],
             None),
            (["bulk.py", "--home", str(home), "--out", str(results / "bulk.json"), "--rounds", bulk_rounds], None),
            (["graph_forms.py", "--json", str(results / "graph_forms.json"), *(["--quick"] if args.quick else [])],
             results / "graph_forms.md"),
            # auto's engine against the fastest same-answer engine, and the compute floor (BENCHMARKS.md, "auto")
            (["auto_choice.py", "--home", str(home), "--out", str(results / "auto_choice.json"), "--rounds",
              forward_rounds, "--models", *models], None),
        ]
        if _native_bf16():  # opt-in bf16 against fp32 (BENCHMARKS.md, "bf16"): on a CPU with bf16 arithmetic
            steps.append((["bf16.py", "--home", str(Path(scratch) / "bf16-home"), "--out", str(results / "bf16.json"),
                           "--rounds", cold_rounds, "--models", *models], None))
        if _serve_installed():  # the [serve] extra: `mixnet serve` against the command line
            steps.append((["serve.py", "--home", str(home), "--out", str(results / "serve.json"),
                           *([] if args.quick else ["--sweep"])], None))
        if args.installs:
            steps.append((["installs.py", "--out", str(results / "installs.json")], None))
        steps.append((["report.py", "--results", str(results), "--out", str(args.out)], None))
        for step, stdout in steps:
            command = [sys.executable, str(HERE / step[0]), *step[1:]]
            if stdout is None:
                subprocess.run(command, check=True, cwd=str(HERE))
            else:
                with open(stdout, "w", encoding="utf-8") as out:
                    subprocess.run(command, check=True, cwd=str(HERE), stdout=out)
        if args.keep is None:
            shutil.rmtree(results, ignore_errors=True)
    return 0


def _native_bf16() -> bool:
    sys.path.insert(0, str(HERE.parent))
    from mixnet_cli.engines.choice import native_bf16

    return native_bf16() is not None


if __name__ == "__main__":
    sys.exit(main())
