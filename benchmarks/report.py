"""Write BENCHMARKS.md from the JSON files that forward.py, coldstart.py and bulk.py wrote.

    python benchmarks/report.py --results DIR --out BENCHMARKS.md [--other DIR ...]

Optional, where DIR holds them: ``installs.json`` (installs.py) adds the section on install time and size per
Python, ``graph_forms.md`` (what graph_forms.py prints) the section on the ONNX graph's form.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from serve import section as serve_section
from serve import summary_rows as serve_summary

FORWARD_TARGET = 1.15
COLD_TARGET = 0.5
BULK_TARGET = 0.75
HELP_TARGET = 0.25
FIRST_USE_TARGET = 2.0
CORE_VENV_TARGET_MB = 600
CORE_VENV_TARGET_PYTHONS = ("3.12", "3.13")
IMPORT_PADDLE = 'python -c "import paddle"'
FIRST_USE = "mixnet classify one.jpg, weights cached, first use (builds the network)"


def _load_average(data: dict[str, Any]) -> str:
    start = data["machine"].get("load_average", data["machine"].get("load_average_at_start"))
    text = ", ".join(f"{x:.2f}" for x in start)
    if "load_average_at_end" in data:
        text += " → " + ", ".join(f"{x:.2f}" for x in data["load_average_at_end"])
    return text


def _loads(forward: dict[str, Any], cold: dict[str, Any], bulk: dict[str, Any]) -> str:
    return "; ".join(f"{name} {_load_average(data)}" for name, data in
                     (("forward pass", forward), ("cold start", cold), ("bulk", bulk)))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _ms(row: dict[str, Any]) -> str:
    return f"{row['median_ms']:.1f} ({row['p10_ms']:.1f}–{row['p90_ms']:.1f})"


def forward_section(data: dict[str, Any]) -> tuple[list[str], float]:
    lines: list[str] = []
    worst = 0.0
    for model, rows in data["models"].items():
        sizes = sorted({r["batch_size"] for r in rows})
        engines = list(dict.fromkeys(r["engine"] for r in rows))
        by = {(r["engine"], r["batch_size"]): r for r in rows}
        fastest = {}
        for size in sizes:
            eligible = [r for r in rows if r["batch_size"] == size and r["same_model"]]
            fastest[size] = min(eligible, key=lambda r: r["median_ms"])
        default = next(e for e in engines if e.startswith("mixnet default"))
        lines += [f"### {model}", "",
                  "Milliseconds per forward pass: median (p10–p90). *Same model*: probabilities within 1e-4 of "
                  "paddle's eager network on a test batch; only those count for *fastest*.", ""]
        header = ["engine"] + [f"batch {s}" for s in sizes] + ["max prob. diff", "same model"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for engine in engines:
            cells = [engine if engine != default else f"**{engine}**"]
            for size in sizes:
                row = by.get((engine, size))
                cells.append("" if row is None else (_ms(row) + (" ⚑" if row is fastest[size] else "")))
            any_row = next(r for r in rows if r["engine"] == engine)
            cells += [f"{any_row['max_probability_diff']:.1e}", "yes" if any_row["same_model"] else "**no**"]
            lines.append("| " + " | ".join(cells) + " |")
        ratios = []
        for size in sizes:
            ratio = by[(default, size)]["median_ms"] / fastest[size]["median_ms"]
            worst = max(worst, ratio)
            ratios.append(f"batch {size}: **{ratio:.2f}x** (fastest: {fastest[size]['engine']})")
        lines += ["", "⚑ fastest same-model engine. Default vs fastest: " + "; ".join(ratios) + ".", ""]
    return lines, worst


def _measured(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _fewer_runs(data: dict[str, Any]) -> str:
    """`` (the dygraph and first-use rows: 5)``: the slow commands, run in the first rounds only."""
    short = {"mixnet classify one.jpg --engine dygraph": "dygraph", FIRST_USE: "first-use"}
    groups: dict[int, list[str]] = {}
    for name, result in data["commands"].items():
        if result["wall_s"]["n"] < data["rounds"]:
            groups.setdefault(result["wall_s"]["n"], []).append(short.get(name, f"`{name}`"))
    parts = [f"the {' and '.join(names)} row{'s' if len(names) > 1 else ''}: {n}" for n, names in groups.items()]
    return f" ({'; '.join(parts)})" if parts else ""


def cold_section(data: dict[str, Any]) -> tuple[list[str], float, float, float, float]:
    """The table, and the ratio to ``import paddle`` (NaN where paddle was not installed), ``--help``'s seconds,
    the peak RSS of one classify, the ratio of a model's first classify to a warm one (NaN where not measured)."""
    commands = data["commands"]
    lines = ["| command | wall, median (p10–p90) | peak RSS, median | runs |", "|---|---|---|---|"]
    for name, result in commands.items():
        wall, rss = result["wall_s"], result["peak_rss_mib"]
        lines.append(f"| `{name}` | {wall['median']:.3f} s ({wall['p10']:.3f}–{wall['p90']:.3f}) | "
                     f"{rss['median']:.0f} MiB | {wall['n']} |")
    help_s = commands["mixnet --help"]["wall_s"]["median"]
    rss = commands["mixnet classify one.jpg"]["peak_rss_mib"]["median"]
    warm = commands["mixnet classify one.jpg"]["wall_s"]["median"]
    ratio = data.get("ratio_classify_to_import_paddle", float("nan"))
    if IMPORT_PADDLE not in commands or ratio is None:
        ratio = float("nan")
    first_use = data.get("ratio_first_use_to_warm")
    if first_use is None:
        first_use = commands[FIRST_USE]["wall_s"]["median"] / warm if FIRST_USE in commands else float("nan")
    if FIRST_USE in commands:
        first_s = commands[FIRST_USE]["wall_s"]["median"]
        lines += ["", f"The first classify of a model whose weights are cached but not yet converted (mixnet builds "
                  f"the network from the weights and converts it, once) takes {first_s:.3f} s: **{first_use:.2f}x** "
                  f"the warm classify ({warm:.3f} s)."]
    if not _measured(ratio):
        lines += ["", f"`{IMPORT_PADDLE}` was not measured: paddle is not installed in the environment that ran the "
                  "benchmarks (the core install), so the cold start is not compared with it."]
    if data.get("baseline"):
        lines += ["", *baseline_lines(data["baseline"], data.get("machine", {}).get("cpu", "?"))]
    return lines, ratio, help_s, rss, first_use


def baseline_lines(compared: dict[str, Any], cpu: str) -> list[str]:
    """The one-image calls of this code against an earlier revision's (coldstart.py --baseline), interleaved."""
    lines = [f"Against revision `{compared['baseline']}` (coldstart.py `--baseline`; {compared['rounds']} rounds, the "
             f"two interleaved, medians; {cpu}):", "",
             "| command | before (wall) | after (wall) | after / before | CPU before | CPU after | CPU after / before |",
             "|---|---|---|---|---|---|---|"]
    for name, row in compared["commands"].items():
        lines.append(f"| `{name}` | {row['before_s']['median']:.3f} s | {row['after_s']['median']:.3f} s | "
                     f"**{row['ratio']:.2f}x** | {row['cpu_before_s']['median']:.3f} s | "
                     f"{row['cpu_after_s']['median']:.3f} s | {row['cpu_ratio']:.2f}x |")
    return lines


def bulk_section(data: dict[str, Any]) -> tuple[list[str], float, float]:
    best = data["best_forward_images_per_s"]
    defaults = data["defaults"]
    default_name = f"batch {defaults['cli_batch_size']}, {defaults['classify_many_workers']} worker(s)"
    lines = [f"{data['images']} photos, model {data['model']}, engine {data['engine']}; decode + resize + "
             f"normalise {data['decode_and_transform_ms_per_image']['median']:.1f} ms per photo on one core.", "",
             "| forward only | images/s, median (p10–p90) |", "|---|---|"]
    for name, s in data["forward_images_per_s"].items():
        mark = " ⚑" if name == data.get("best_forward") else ""
        lines.append(f"| {name}{mark} | {s['median']:.1f} ({s['p10']:.1f}–{s['p90']:.1f}) |")
    lines += ["", "⚑ the best forward-only rate: the ceiling the pipeline is measured against."]
    lines += ["", "| `classify_many` over the photo files | images/s, median (p10–p90) | vs best forward |",
              "|---|---|---|"]
    for name, s in data["pipeline_images_per_s"].items():
        mark = " (the default)" if name == default_name else ""
        lines.append(f"| {name}{mark} | {s['median']:.1f} ({s['p10']:.1f}–{s['p90']:.1f}) | "
                     f"{s['median'] / best:.2f}x |")
    pipeline = data["pipeline_images_per_s"].get(default_name, {"median": float("nan")})["median"]
    cli = data["cli_images_per_s"]["median"]
    paired = data.get("default_pipeline_to_best_forward_paired")
    ratio = paired["median"] if paired else pipeline / best
    # End to end: `mixnet classify DIR --jsonl` against the best forward-only rate of the same round, the median
    # of those per-round ratios (bulk.py); older result files have only the ratio of the medians.
    cli_paired = data.get("cli_to_best_forward_paired")
    cli_ratio = cli_paired["median"] if cli_paired else cli / best
    lines += ["", f"The default ({default_name}) against the best forward-only rate (⚑) measured in the same round, "
              f"median over rounds: **{ratio:.2f}x** (ratio of the medians above: {pipeline / best:.2f}x).", "",
              f"`mixnet classify DIR --jsonl` end to end (process start, model load and all): "
              f"{cli:.1f} images/s, **{cli_ratio:.2f}x** the best forward-only rate of the same round, median over "
              f"rounds (ratio of the medians: {cli / best:.2f}x).", ""]
    baseline = data.get("baseline_cli_to_best_forward_paired")
    if baseline:
        lines += [f"The same command from the baseline checkout ({data['baseline']}), timed in the same rounds: "
                  f"{data['baseline_cli_images_per_s']['median']:.1f} images/s, {baseline['median']:.2f}x; this "
                  f"code's time per run against the baseline's, paired by round: "
                  f"{1 / data['cli_to_baseline_paired']['median']:.2f}x.", ""]
    return lines, ratio, cli_ratio


def _opencv(row: dict[str, Any]) -> str:
    found = row.get("opencv") or {}
    text = " + ".join(f"{name} {version}" for name, version in found.items()) or "**none**"
    return text + (" **(more than one)**" if len(found) > 1 else "")


def _paddle_present(row: dict[str, Any]) -> str:
    present = [f"{name} {version}" for name, version in (row.get("paddle") or {}).items() if version]
    return ", ".join(present) if present else "no"


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def core_venv_target(data: dict[str, Any]) -> tuple[str, str]:
    """The core venvs' sizes on the target Pythons (``3.12: 558 MB``) and the verdict on the target."""
    measured = {row["python"]: row["venv_mb"] for row in data["installs"]
                if row["kind"] == "core" and row.get("install_s") and row.get("venv_mb") is not None}
    measured = {p: measured[p] for p in CORE_VENV_TARGET_PYTHONS if p in measured}
    missing = [p for p in CORE_VENV_TARGET_PYTHONS if p not in measured]
    sizes = ", ".join(f"{p}: {measured[p]:.0f} MB" if p in measured else f"{p}: not measured"
                      for p in CORE_VENV_TARGET_PYTHONS)
    if not measured:
        return sizes, "not measured"
    if any(mb > CORE_VENV_TARGET_MB for mb in measured.values()):
        return sizes, "**not met**"
    return sizes, "met" if not missing else "met where measured"


def installs_section(data: dict[str, Any]) -> list[str]:
    rows = data["installs"]
    loads = " → ".join(", ".join(f"{x:.2f}" for x in values)
                       for values in (data["machine"]["load_average"], data["load_average_at_end"]))
    lines = ["## Install: time and size per Python", "",
             "Made by `python benchmarks/installs.py`: per Python, a fresh venv with pip upgraded first, then the "
             "project installed from a copy of its tree with an empty pip cache (a cold, first-time install: "
             "every wheel downloaded or taken from pip's configured mirrors again, so the times depend on the "
             "network), core (`pip install .`) and with the extra (`pip install \".[paddle]\"`). "
             + (f"{data['rounds']} rounds, medians" if data["rounds"] > 1 else "One round")
             + "; venv size by `du -sm`; `mixnet --help` timed once after an "
             f"untimed run. Load average (1, 5, 15 min): {loads}.", "",
             "| Python | kind | install, s | venv, MB | pip check | OpenCV | numpy | paddle present | "
             "`mixnet --help`, s |",
             "|---|---|---|---|---|---|---|---|---|"]
    failed = []
    for row in rows:
        python = row.get("python_version") or row["python"]
        kind = "core" if row["kind"] == "core" else "core + [paddle]"
        if not row.get("install_s"):
            why = "Python not found" if row.get("skipped") else "**install failed**"
            lines.append(f"| {python} | {kind} | {why} | | | | | | |")
            failed.append(row)
            continue
        if row.get("failures"):
            failed.append(row)
        check = row.get("pip_check") or {}
        check_text = "OK" if check.get("ok") else "**broken**: " + (check.get("output", "").splitlines() or [""])[0]
        failures = f" ({row['failures']} of {row['rounds']} failed)" if row.get("failures") else ""
        lines.append(f"| {python} | {kind} | {_number(row['install_s'], 1)}{failures} | {_number(row['venv_mb'], 0)} | "
                     f"{check_text} | {_opencv(row)} | {row.get('numpy') or '–'} | {_paddle_present(row)} | "
                     f"{_number(row.get('help_s'), 3)} |")
    by = {(row["python"], row["kind"]): row for row in rows if row.get("install_s")}
    ratios = []
    for python in dict.fromkeys(row["python"] for row in rows):
        core, paddle = by.get((python, "core")), by.get((python, "paddle"))
        if core and paddle and core.get("venv_mb") and paddle.get("venv_mb"):
            ratios.append(f"{python}: size **{core['venv_mb'] / paddle['venv_mb']:.2f}x** "
                          f"({core['venv_mb']:.0f} / {paddle['venv_mb']:.0f} MB), "
                          f"time **{core['install_s'] / paddle['install_s']:.2f}x** "
                          f"({core['install_s']:.1f} / {paddle['install_s']:.1f} s)")
    if ratios:
        lines += ["", "Core against core + [paddle], per Python: " + "; ".join(ratios) + "."]
    sizes, verdict = core_venv_target(data)
    lines += ["", f"Target: the core venv at most {CORE_VENV_TARGET_MB} MB on Python "
              f"{' and '.join(CORE_VENV_TARGET_PYTHONS)} ({sizes}): {verdict}."]
    for row in failed:
        kind = "core" if row["kind"] == "core" else "core + [paddle]"
        lines += ["", f"{row.get('python_version') or row['python']}, {kind}: {row.get('error')}"]
        if row.get("log_tail"):
            tail = row["log_tail"].splitlines()
            errors = list(dict.fromkeys(line.strip() for line in tail if "ERROR:" in line))
            lines += ["", "```", *(errors[-5:] or tail[-10:]), "```"]
    return lines + [""]


def _default_form(results: Path) -> str:
    """The label of mixnet's default graph form (``DEFAULT_FORM``), else what graph_forms.json recorded."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from mixnet_cli.network.onnx_graph import DEFAULT_FORM

        return DEFAULT_FORM.label
    except ImportError:
        if (results / "graph_forms.json").exists():
            return _load(results / "graph_forms.json").get("default_form", "the default form")
        return "the default form"


def graph_forms_section(results: Path) -> list[str]:
    text = (results / "graph_forms.md").read_text(encoding="utf-8")
    body = []
    for line in text.strip("\n").splitlines():
        if line.startswith("# "):  # its own title: this section's stands instead
            continue
        body.append("#" + line if line.startswith("#") else line)
    while body and not body[0].strip():
        body.pop(0)
    return ["## Graph form: mixnet's ONNX graph against paddle2onnx's", "",
            f"mixnet writes MixNet's ONNX graph itself, by default in the form *{_default_form(results)}* "
            "(`DEFAULT_FORM` in mixnet_cli/network/onnx_graph.py; *dw*/*bn* in the tables), and the tables below, from "
            "`python benchmarks/graph_forms.py`, time every form against the graph paddle2onnx makes of "
            "paddleclas's network, side by side in one run.", "", *body, ""]


def _summary_ratios(results: Path) -> tuple[float, float, float, float, str]:
    forward = _load(results / "forward.json")
    _, worst = forward_section(forward)
    _, cold_ratio, help_s, _, _ = cold_section(_load(results / "coldstart.json"))
    _, bulk_ratio, _ = bulk_section(_load(results / "bulk.json"))
    return worst, cold_ratio, bulk_ratio, help_s, _loads(forward, _load(results / "coldstart.json"),
                                                         _load(results / "bulk.json"))


def other_runs_section(others: list[Path]) -> list[str]:
    if not others:
        return []
    lines = ["## Other runs", "",
             "The same measurements on the same machine at other times, with the code as it was then (other "
             "processes were running; the load average is the machine's when each part finished), to show how far "
             "the noise moves the ratios:", "",
             "| run | load average (1, 5, 15 min) | 1. forward, worst | 2. cold start | 3. bulk | 4. --help |",
             "|---|---|---|---|---|---|"]
    for index, results in enumerate(others, start=1):
        worst, cold_ratio, bulk_ratio, help_s, load = _summary_ratios(results)
        cold = f"{cold_ratio:.2f}x" if _measured(cold_ratio) else "not measured"
        lines.append(f"| {index} | {load} | {worst:.2f}x | {cold} | "
                     f"{bulk_ratio:.2f}x | {help_s:.3f} s |")
    return lines + [""]


def render(results: Path, others: list[Path] | None = None) -> str:
    forward = _load(results / "forward.json")
    cold = _load(results / "coldstart.json")
    bulk = _load(results / "bulk.json")
    machine = forward["machine"]
    forward_lines, worst = forward_section(forward)
    cold_lines, cold_ratio, help_s, rss, first_use = cold_section(cold)
    bulk_lines, bulk_ratio, cli_ratio = bulk_section(bulk)
    installs = _load(results / "installs.json") if (results / "installs.json").exists() else None
    graph_lines = graph_forms_section(results) if (results / "graph_forms.md").exists() else []
    serve_lines = serve_section(_load(results / "serve.json")) if (results / "serve.json").exists() else []
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    out = [
        "# Benchmarks",
        "",
        "Measured by `python benchmarks/run_all.py` (one run: goals side by side on the same machine, variants "
        "interleaved round by round, medians reported). Weights are the tests' calibrated weights in the real "
        "`.pdparams` format, with every parameter of the architecture (speed does not depend on their values; "
        "they answer like trained weights, so the same-model check means something), installed in a temporary "
        "`MIXNET_HOME` and converted by mixnet itself. The machine is shared and noisy: compare ratios, not "
        "absolute times.",
        "",
        f"- Machine: {machine['cpu']} ({machine['cpu_flags']}), {machine['logical_cpus']} logical CPUs, "
        f"{machine['physical_cores_available']} physical cores available, {machine['memory']}",
        f"- Load average (1, 5, 15 min; other processes share the machine): {_loads(forward, cold, bulk)}",
        f"- Python {machine['python']} on {machine['platform']}",
        f"- {versions}",
        "- No GPU here: the GPU engines (torch with CUDA, onnxruntime-gpu, Paddle Inference on CUDA/TensorRT) have "
        "not run on a GPU yet; `benchmarks/gpu.sh` is the check for a GPU machine (section *GPU*).",
        "",
        "## Summary",
        "",
        "| goal | measured | target | |",
        "|---|---|---|---|",
        f"| 1. forward pass: default engine vs the fastest same-model engine found (worst of S/M/L × batch "
        f"1/4/8) | {worst:.2f}x | ≤ {FORWARD_TARGET}x | {verdict(worst <= FORWARD_TARGET)} |",
        "| 2. cold start: `mixnet classify one.jpg` (cached) / `python -c \"import paddle\"` | "
        + (f"{cold_ratio:.2f}x | ≤ {COLD_TARGET}x | {verdict(cold_ratio <= COLD_TARGET)} |" if _measured(cold_ratio)
           else f"not measured (paddle not installed) | ≤ {COLD_TARGET}x | |"),
        *([f"| 2. first classify of a model, weights cached / warm classify | {first_use:.2f}x | "
           f"≤ {FIRST_USE_TARGET:g}x | {verdict(first_use <= FIRST_USE_TARGET)} |"] if _measured(first_use) else []),
        f"| 3. bulk: classifying {bulk['images']} photos with the defaults / best forward-only rate | "
        f"{bulk_ratio:.2f}x (end to end incl. start-up: {cli_ratio:.2f}x) | ≥ {BULK_TARGET}x | "
        f"{verdict(bulk_ratio >= BULK_TARGET)} |",
        f"| 4. `mixnet --help` | {help_s:.3f} s | ≤ {HELP_TARGET} s | {verdict(help_s <= HELP_TARGET)} |",
        f"| 4. peak RSS classifying one image (default engine) | {rss:.0f} MiB | (reported) | |",
        *([f"| 5. core install: venv size on Python {'/'.join(CORE_VENV_TARGET_PYTHONS)} | "
           f"{core_venv_target(installs)[0]} | ≤ {CORE_VENV_TARGET_MB} MB | {core_venv_target(installs)[1]} |"]
          if installs is not None else []),
        *serve_summary(_load(results / "serve.json") if (results / "serve.json").exists() else None, verdict),
        "",
        "## 1. Forward pass (CPU)",
        "",
        f"{forward['rounds']} rounds; in each, every engine runs each batch size {forward['runs_per_round']} times "
        "back to back and the fastest of those is the round's sample (a burst of load from another process then "
        "slows one run, not the round); engines in a new random order each round, after warm-up runs at every size. *mixnet* rows are mixnet's engines as "
        "`Classifier(engine=...)` builds them; the others are raw sessions on the same converted model with "
        "other settings: the library defaults, ONNX Runtime with spinning threads or a fixed batch dimension, "
        "OpenVINO with the throughput hint or a static batch.",
        "",
        *forward_lines,
        "## 2. Cold start and memory",
        "",
        f"Fresh processes, {cold['rounds']} interleaved rounds{_fewer_runs(cold)}, with the weights and the "
        "converted model already cached; bytecode cached as in an installed package. Peak RSS is the "
        "process's maximum resident set.",
        "",
        *cold_lines,
        "",
        "## 3. Bulk classification",
        "",
        *bulk_lines,
        *serve_lines,
        *(installs_section(installs) if installs is not None else []),
        *graph_lines,
        *other_runs_section(others or []),
        "## What was tried",
        "",
        "- OpenVINO and ONNX Runtime run the same converted model within 0.9-1.2x of each other here; ONNX Runtime "
        "is the default CPU engine because it starts without a compile (section 2). OpenVINO is asked for f32 precision: by default it computes in bf16 on CPUs with "
        "bf16 units (the *library defaults* row), which is faster but moves probabilities by far more than 1e-4.",
        "- A fixed batch dimension makes OpenVINO about 20% faster at batch 1 than a dynamic one, and its first "
        "inference much cheaper; mixnet makes one fixed-size model per batch size on first use (cached), and "
        "runs a smaller batch on a model up to twice its size, padded.",
        "- Measuring on a shared 2-core machine: with one timed run per engine per round, run 1 under *Other runs* "
        "put the default at 1.43x for MixNet_M at batch 4 against *openvino: static batch 4, f32*, which is the same "
        "fixed-batch model with the same settings: when another process takes a core, a forward pass whose two "
        "threads meet at every layer takes half as long again or more, and a few such bursts moved a median. Each "
        "round's sample is now the fastest of 3 back-to-back runs.",
        "- ONNX Runtime: graph optimisation level ALL matters (EXTENDED was about 1.6x slower, measured "
        "separately); sequential execution; intra-op threads = physical cores. mixnet turns thread spinning off: "
        "spinning is faster in isolation (the *library defaults* and *spinning threads* rows, up to a quarter at "
        "batch 1), but the spinning threads take the cores the decode threads need in bulk runs, and were the "
        "slowest setting of all when another process was busy. A fixed batch dimension does not help it.",
        "- Paddle Inference with oneDNN is 2-3x slower than ONNX Runtime on MixNet (its split-and-concat mixed "
        "convolutions), and paddle's eager mode slower still; both need `import paddle` (over a second).",
        "- Cold start: nothing of paddle, paddleclas or paddle2onnx is imported once the model is cached (a test "
        "checks it), nor tqdm when no progress bar is shown. What is left is Python and numpy, Pillow, cv2, the "
        "engine's import (OpenVINO about 0.18 s, half of it its model-conversion tools, which its package imports "
        "unconditionally; ONNX Runtime 0.03-0.08 s, imported only when it runs: `auto` looks for its CUDA provider library on disk "
        "instead), loading the compiled model from the cache, and hashing the weights and the converted model "
        "against their records. `--engine onnxruntime` starts about 0.15 s faster "
        "than OpenVINO, which is faster per image from about the 30th image on.",
        "- Bulk: on 2 cores the engine wants both cores and decoding wants about 2 ms of CPU per photo "
        "(libjpeg-turbo's decode alone about 1.4 ms), so the ceiling is about (forward time) / (forward time + "
        "decode time / 2), roughly 0.8x here. What got there: (1) OpenVINO's throughput mode for jobs of more than "
        "32 images: two streams of one thread, each with a batch of its own, instead of one batch on two threads. "
        "In latency mode the two threads meet at every layer, so when a decoder takes one core the other thread "
        "waits; streams do not wait for each other. Alone it is also the faster mode (the forward-only table above) "
        "and much the steadier when other processes are busy. Both modes load the same compiled blob from the "
        "cache. (2) `classify_many` runs the engine from threads of its own with one batch more in flight than the "
        "engine runs at once, so the main thread keeps the decoders fed; before, the decode window ran dry while "
        "each batch ran. (3) The normalisation after the move to CHW (twice as fast, the same bits) and no copy "
        "from `exif_transpose` for upright photos. Tried without gain: 1, 2 or 3 decode workers (the same within "
        "the noise), a lower priority for the decode threads, a lookup table for the normalisation (slower than "
        "numpy's in-place arithmetic), CPU pinning on or off for the streams, a shorter GIL switch interval. What "
        "is left is the CPU itself: the pipeline's process CPU time is that of the forward passes plus that of "
        "the decoding plus about 5% (decoding evicts the network from the caches, so each forward pass is slower "
        "than alone), with both cores busy about 96% of the time; the Python around them (threads, futures, "
        "results) costs under 1% (measured with an engine that returns at once).",
        "",
    ]
    return "\n".join(out)


# Sections written by hand (measured by other means: the service's attack passes, Ray, the speed goals of one CPU,
# the GPU): every ``## `` or ``### `` block of the existing report whose heading the rendered report does not write.
# Each is kept verbatim after the block it followed before (when the rendered report still has that one), else before
# the install section, so that writing the report again never loses what a run of run_all.py does not measure.
_BLOCK = re.compile(r"(?m)^(?=##+ )")


def _blocks(text: str) -> list[tuple[str, str]]:
    """``text`` cut before each ``## `` / ``### `` heading: (key, block) pairs. The key is the heading line, under
    its ``## `` heading for a ``### `` one (``### MixNet_S`` is in several sections); the preamble's key is ""."""
    blocks = []
    section = ""
    for block in _BLOCK.split(text):
        if not block:
            continue
        heading = block.splitlines()[0].strip() if block.startswith("#") else ""
        if heading.startswith("## "):
            section = heading
        key = f"{section} / {heading}" if heading.startswith("### ") else heading
        blocks.append((key, block if block.endswith("\n\n") else block.rstrip("\n") + "\n\n"))
    return blocks


def hand_written_sections(existing: str, report: str) -> list[tuple[str, str, str]]:
    """The blocks of ``existing`` that ``report`` does not write: (key of the block before it, its key, block)."""
    rendered = {heading for heading, _ in _blocks(report)}
    kept, previous = [], ""
    for key, block in _blocks(existing):
        if key and key not in rendered:
            kept.append((previous, key, block))
        previous = key
    return kept


def keep_hand_written(report: str, existing: str) -> str:
    """``report`` with the hand-written blocks of ``existing`` put back (see :func:`hand_written_sections`)."""
    kept = hand_written_sections(existing, report)
    if not kept:
        return report
    blocks = _blocks(report)
    keys = {key for key, _ in blocks}
    after: dict[str, list[tuple[str, str]]] = {}
    loose = []
    for previous, key, block in kept:
        # A run of hand-written blocks follows the rendered block its first one followed.
        if previous in keys or previous in after:
            after.setdefault(previous, []).append((key, block))
            after.setdefault(key, [])
        else:
            loose.append(block)
    out: list[str] = []
    # A hand-written "## " section that followed a rendered "### " block waits for the end of the rendered section,
    # so that it never splits the section's own "### " blocks from it.
    waiting: list[tuple[str, str]] = []

    def emit(key: str) -> None:
        for next_key, block in after.get(key, []):
            if " / " in key and " / " not in next_key:
                waiting.append((next_key, block))
                continue
            out.append(block)
            emit(next_key)

    def release() -> None:
        while waiting:
            next_key, block = waiting.pop(0)
            out.append(block)
            emit(next_key)

    for key, block in blocks:
        if " / " not in key:
            release()
        if key in ("## Install: time and size per Python", "## What was tried") and loose:
            out.extend(loose)
            loose = []
        out.append(block)
        emit(key)
    release()
    return "".join(out + loose)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--other", type=Path, action="append", default=[],
                        help="results of another run, summarised in a table (repeatable)")
    args = parser.parse_args(argv)
    report = render(args.results, args.other)
    if args.out.exists():
        report = keep_hand_written(report, args.out.read_text(encoding="utf-8"))
    args.out.write_text(report, encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
