"""Install the project cold into a fresh virtual environment per Python and install kind: time, size, what came in.

For each Python (3.11: ``python3``; 3.12 and 3.13: pyenv's, ``$(pyenv root)/versions/3.1X*/bin/python3.1X``, each
checked with ``--version``, since pyenv's shims on PATH exist but fail for versions not selected) and each kind
(core: ``pip install <project root>``; paddle: ``pip install "<project root>[paddle]"``, by default on 3.11 and 3.12
only), this makes a venv in a temporary directory, upgrades its pip, then times the install with an empty pip cache
(``PIP_CACHE_DIR`` in the temporary directory: a cold, first-time install; wheels still come from wherever pip's
configuration points, the network or local mirrors). Then it measures the venv's size (``du -sm``), runs
``pip check``, lists the OpenCV distributions (exactly one is expected), numpy's version and whether paddlepaddle,
paddleclas and paddle2onnx came in, and times ``mixnet --help`` once (after one untimed run). The project is
installed from a copy of its tree made at the start (without .git and build outputs), so that edits made during
the run and pip's build directories do not touch each other.

Each install's output goes to a log file under the temporary directory; a failed install is recorded with the
last lines of its log and the run goes on. With ``--rounds N`` every install is made N times (round by round,
a fresh venv and an empty cache each time) and the medians are reported. The venvs are deleted at the end
unless ``--keep DIR`` (then venvs, logs and the source copy stay in DIR; the pip caches are always deleted).
Needs the network (or mirrors) and takes minutes: about 30 s per core install and 1-2 minutes per [paddle] one.

    python benchmarks/installs.py --out installs.json [--pythons 3.11 3.12 3.13] [--kinds core paddle] [--rounds 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, log, machine, run_process, write_json

PYTHONS = ("3.11", "3.12", "3.13")
KINDS = ("core", "paddle")
# paddleclas (in the [paddle] extra) only installs on Python < 3.12; paddlepaddle alone on 3.12. 3.13 is left out
# by default.
PADDLE_PYTHONS = ("3.11", "3.12")
OPENCV = ("opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless")
PADDLE = ("paddlepaddle", "paddlepaddle-gpu", "paddleclas", "paddle2onnx")
LOG_TAIL = 30  # lines of a failed install's log kept in the JSON
INSTALL_TIMEOUT_S = 1800
# What the copy of the source tree leaves out: version control, build outputs, caches, local environments.
SOURCE_IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", ".venv*", "venv*",
                                       ".pytest_cache", ".mypy_cache", ".tox")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_of(executable: str) -> str | None:
    """``X.Y.Z`` from ``executable --version``, or None when it does not run (a pyenv shim for a version not
    selected exits 127)."""
    try:
        done = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"Python (\d+\.\d+\.\d+)", done.stdout + done.stderr)
    return match.group(1) if done.returncode == 0 and match else None


def _pyenv_root() -> Path | None:
    try:
        done = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=60)
        if done.returncode == 0 and done.stdout.strip():
            return Path(done.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    return Path(root) if Path(root).is_dir() else None


def find_python(version: str) -> dict[str, Any]:
    """The first interpreter of ``version`` (``3.12``) that runs: ``python3`` for 3.11, then pyenv's, then
    ``python3.X`` on PATH."""
    candidates: list[str] = []
    if version == "3.11" and shutil.which("python3"):
        candidates.append(shutil.which("python3") or "python3")
    root = _pyenv_root()
    if root is not None:
        candidates += sorted(glob.glob(str(root / "versions" / f"{version}*" / "bin" / f"python{version}")),
                             reverse=True)
    if shutil.which(f"python{version}"):
        candidates.append(shutil.which(f"python{version}") or f"python{version}")
    tried = []
    for candidate in dict.fromkeys(candidates):
        found = _version_of(candidate)
        tried.append(f"{candidate}: {found or 'does not run'}")
        if found is not None and (found == version or found.startswith(version + ".")):
            real = subprocess.run([candidate, "-c", "import sys; print(sys.executable)"], capture_output=True,
                                  text=True, timeout=60).stdout.strip()
            return {"executable": real or candidate, "found_as": candidate, "version": found}
    return {"executable": None, "version": None, "error": f"no Python {version} that runs (tried: "
            + ("; ".join(tried) or "nothing found") + ")"}


def child_env(venv: Path, cache: Path) -> dict[str, str]:
    """The environment of a shell with ``venv`` activated and an empty pip cache; pip's own configuration
    (indexes, mirrors, constraints) is kept."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MIXNET_") and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIP_CACHE_DIR",
                                                        "PIP_NO_CACHE_DIR", "PYTHONDONTWRITEBYTECODE",
                                                        "__PYVENV_LAUNCHER__", "CONDA_PREFIX")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", "")
    env["PIP_CACHE_DIR"] = str(cache)
    env["MIXNET_HOME"] = str(cache.parent / "mixnet-home")
    return env


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _du_mb(path: Path) -> float | None:
    done = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True)
    try:
        return float(done.stdout.split()[0])
    except (IndexError, ValueError):
        return None


def install_once(python: dict[str, Any], version: str, kind: str, source: Path, work: Path, round_index: int,
                 timeout: float) -> dict[str, Any]:
    """One cold install of ``kind`` with ``python`` into a new venv under ``work``; never raises for a failed
    step, records it."""
    name = f"{version}-{kind}-r{round_index + 1}"
    venv, logs, cache = work / "venvs" / name, work / "logs" / name, work / "cache" / name
    for path in (venv, logs, cache):
        shutil.rmtree(path, ignore_errors=True)
    logs.mkdir(parents=True)
    cache.mkdir(parents=True)  # empty: nothing downloaded or built before counts
    target = str(source) if kind == "core" else f"{source}[paddle]"
    result: dict[str, Any] = {"round": round_index + 1, "venv": str(venv), "log": str(logs / "install.log"),
                              "ok": False}
    env = child_env(venv, cache)
    python_exe = str(venv / "bin" / "python")

    def step(label: str, command: list[str], log_name: str, limit: float = 600) -> tuple[int, float]:
        start = time.perf_counter()
        with open(logs / log_name, "wb") as out:
            try:
                code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=limit,
                                      cwd=str(work)).returncode
            except subprocess.TimeoutExpired:
                out.write(f"\n[installs.py] {label}: timed out after {limit:.0f} s\n".encode())
                code = 124
        return code, time.perf_counter() - start

    log(f"{name}: venv with {python['executable']} ({python['version']})")
    code, _ = step("venv", [python["executable"], "-m", "venv", str(venv)], "venv.log", 300)
    if code != 0:
        result.update(error=f"python -m venv failed (exit {code})", log_tail=_tail(logs / "venv.log"))
        return result
    # pip upgraded first, through a cache of its own (discarded), so the install's cache starts empty.
    upgrade_env_cache = work / "cache" / f"{name}-pip-upgrade"
    env["PIP_CACHE_DIR"] = str(upgrade_env_cache)
    code, _ = step("pip upgrade", [python_exe, "-m", "pip", "install", "--upgrade", "pip"], "pip-upgrade.log")
    env["PIP_CACHE_DIR"] = str(cache)
    shutil.rmtree(upgrade_env_cache, ignore_errors=True)
    if code != 0:
        result["pip_upgrade_error"] = f"exit {code}: {_tail(logs / 'pip-upgrade.log', 5)}"
    pip_version = subprocess.run([python_exe, "-m", "pip", "--version"], env=env, capture_output=True, text=True)
    result["pip"] = pip_version.stdout.split()[1] if pip_version.returncode == 0 and pip_version.stdout else None

    log(f"{name}: pip install {'.' if kind == 'core' else '.[paddle]'} (cold cache; log {logs / 'install.log'})")
    code, seconds = step("install", [python_exe, "-m", "pip", "install", target], "install.log", timeout)
    result["install_s"] = seconds
    result["install_exit"] = code
    shutil.rmtree(cache, ignore_errors=True)
    if code != 0:
        result.update(error=f"pip install failed (exit {code})", log_tail=_tail(logs / "install.log"))
        result["venv_mb"] = _du_mb(venv)
        return result

    result["venv_mb"] = _du_mb(venv)
    check = subprocess.run([python_exe, "-m", "pip", "check"], env=env, capture_output=True, text=True)
    result["pip_check"] = {"ok": check.returncode == 0,
                           "output": "\n".join((check.stdout + check.stderr).strip().splitlines()[-20:])}
    listing = subprocess.run([python_exe, "-m", "pip", "list", "--format=json"], env=env, capture_output=True,
                             text=True)
    try:
        packages = {_normalise(p["name"]): p["version"] for p in json.loads(listing.stdout)}
    except (ValueError, KeyError, TypeError):
        packages = {}
    (logs / "pip-list.json").write_text(json.dumps(packages, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    result["packages"] = len(packages)
    result["opencv"] = {n: packages[n] for n in OPENCV if n in packages}
    result["one_opencv"] = len(result["opencv"]) == 1
    result["numpy"] = packages.get("numpy")
    result["paddle"] = {n: packages.get(n) for n in PADDLE}
    result["mixnet_cli"] = packages.get("mixnet-cli")

    mixnet = str(venv / "bin" / "mixnet")
    try:
        run_process([mixnet, "--help"], env)  # untimed: the disk cache, as a user's second run
        result["help_s"], _, _ = run_process([mixnet, "--help"], env)
    except (OSError, RuntimeError) as error:
        result["help_s"] = None
        result["help_error"] = str(error)[-1000:]
    result["ok"] = True
    log(f"{name}: {seconds:.1f} s, {result['venv_mb']} MB, pip check {'OK' if check.returncode == 0 else 'FAILED'}, "
        f"OpenCV {result['opencv']}, numpy {result['numpy']}, mixnet --help {result['help_s']} s")
    return result


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def combine(version: str, python: dict[str, Any], kind: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row: the medians over rounds of the successful runs, the facts of the last successful one."""
    target = "<project root>" if kind == "core" else '"<project root>[paddle]"'
    row: dict[str, Any] = {"python": version, "python_version": python.get("version"),
                           "python_executable": python.get("executable"), "kind": kind,
                           "command": f"pip install {target}", "rounds": len(runs)}
    good = [r for r in runs if r["ok"]]
    row["ok"] = bool(good) and len(good) == len(runs)
    row["failures"] = len(runs) - len(good)
    if good:
        last = good[-1]
        for key in ("pip", "pip_check", "packages", "opencv", "one_opencv", "numpy", "paddle", "mixnet_cli"):
            row[key] = last.get(key)
        for key in ("install_s", "venv_mb", "help_s"):
            row[key] = _median([r.get(key) for r in good])
            row[f"{key}_samples"] = [r.get(key) for r in good]
    failed = [r for r in runs if not r["ok"]]
    if failed:
        row["error"] = failed[-1].get("error")
        row["log_tail"] = failed[-1].get("log_tail", "")
    row["runs"] = runs
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the results, as JSON")
    parser.add_argument("--rounds", type=int, default=1, help="installs of each kind per Python (medians reported)")
    parser.add_argument("--pythons", nargs="+", default=list(PYTHONS), help=f"default: {' '.join(PYTHONS)}")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--paddle-pythons", nargs="+", default=list(PADDLE_PYTHONS),
                        help=f"the Pythons the paddle kind is installed on (default: {' '.join(PADDLE_PYTHONS)})")
    parser.add_argument("--keep", type=Path, help="make the venvs here and keep them (with the logs)")
    parser.add_argument("--timeout", type=float, default=INSTALL_TIMEOUT_S, help="seconds per pip install")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    at_start = machine()
    started = time.time()
    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="mixnet-installs-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = work / "src"
        shutil.rmtree(source, ignore_errors=True)
        shutil.copytree(ROOT, source, ignore=SOURCE_IGNORE)
        pythons = {version: find_python(version) for version in args.pythons}
        for version, python in pythons.items():
            log(f"Python {version}: {python.get('executable') or python['error']}")
        plan = [(version, kind) for version in args.pythons for kind in args.kinds
                if kind == "core" or version in args.paddle_pythons]
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in plan}
        for round_index in range(args.rounds):
            for version, kind in plan:
                if pythons[version]["executable"] is None:
                    continue
                runs[(version, kind)].append(install_once(pythons[version], version, kind, source, work,
                                                          round_index, args.timeout))
                if args.keep is None:  # only the facts are kept; a venv of paddle is 1-2 GB
                    shutil.rmtree(work / "venvs" / f"{version}-{kind}-r{round_index + 1}", ignore_errors=True)
        rows = []
        for version, kind in plan:
            if pythons[version]["executable"] is None:
                rows.append({"python": version, "python_version": None, "kind": kind, "ok": False, "rounds": 0,
                             "failures": 0, "skipped": True, "error": pythons[version]["error"], "runs": []})
            else:
                rows.append(combine(version, pythons[version], kind, runs[(version, kind)]))
    finally:
        shutil.rmtree(work / "cache", ignore_errors=True)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, {
        "machine": at_start, "load_average_at_end": list(os.getloadavg()), "rounds": args.rounds,
        "seconds": time.time() - started, "source": str(ROOT), "kept": str(work) if args.keep else None,
        "pythons": pythons, "installs": rows,
    })
    for row in rows:
        if row["ok"]:
            log(f"{row['python']} {row['kind']}: {row['install_s']:.1f} s, {row['venv_mb']} MB, "
                f"mixnet --help {row['help_s']} s")
        else:
            log(f"{row['python']} {row['kind']}: FAILED: {row.get('error')}")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
