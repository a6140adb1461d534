"""Measure every goal in one run on this machine and write BENCHMARKS.md.

    python benchmarks/run_all.py [--quick] [--keep DIR]

Makes a temporary MIXNET_HOME with random-initialised weights for S, M and L (the real file format; nothing
is downloaded), lets mixnet convert them once, then runs forward.py, coldstart.py and bulk.py one after the
other, each in its own process, and renders their JSON into BENCHMARKS.md (raw results under --keep). Takes
about 15 minutes on 2 cores; --quick runs fewer rounds and only MixNet_S, for a smoke test of the scripts.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, MixNet_S only")
    parser.add_argument("--keep", type=Path, help="keep the JSON results in this directory")
    parser.add_argument("--out", type=Path, default=HERE.parent / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mixnet-bench-") as scratch:
        home = Path(scratch) / "home"
        results = args.keep or Path(scratch) / "results"
        results.mkdir(parents=True, exist_ok=True)
        models = ["MixNet_S"] if args.quick else ["MixNet_S", "MixNet_M", "MixNet_L"]
        forward_rounds, cold_rounds, bulk_rounds = ("2", "2", "1") if args.quick else ("15", "9", "5")
        steps = [
            ["forward.py", "--home", str(home), "--out", str(results / "forward.json"), "--rounds", forward_rounds,
             "--models", *models],
            ["coldstart.py", "--home", str(home), "--out", str(results / "coldstart.json"), "--rounds", cold_rounds],
            ["bulk.py", "--home", str(home), "--out", str(results / "bulk.json"), "--rounds", bulk_rounds],
            ["report.py", "--results", str(results), "--out", str(args.out)],
        ]
        for step in steps:
            subprocess.run([sys.executable, str(HERE / step[0]), *step[1:]], check=True, cwd=str(HERE))
        if args.keep is None:
            shutil.rmtree(results, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
