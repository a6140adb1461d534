"""Which way of writing MixNet's ONNX graph runs fastest: every GraphForm of mixnet's own graph against paddle2onnx's.

mixnet writes the network's ONNX graph itself (:func:`mixnet_cli.network.onnx_graph.build_onnx`), in one of several
equivalent forms (:class:`~mixnet_cli.network.onnx_graph.GraphForm`): mixed depthwise convolutions merged into one
(kernels zero-padded) or split per kernel size; mixed 1x1 convolutions as one grouped convolution or split;
batch norm folded into the convolutions or kept as BatchNormalization nodes; mixed 1x1 convolutions whose groups
take fewer than 16 inputs (or all of them, MixNet_S only) as one dense convolution with a block-diagonal kernel.
This script builds, from the same random weights (tests/weightgen.py, ``wild=True``), every form for MixNet_S (11)
and, to keep the run short, the 6 forms with grouped 1x1 convolutions for MixNet_M and MixNet_L (``--all-forms``
for all of them everywhere),
plus the graph paddle2onnx makes of paddleclas's network with those weights (``paddle.jit.save``, then
``paddle2onnx.export(..., opset_version=13, optimize_tool="None")``, in one child process up front; the column
is skipped, saying why, when paddle, paddleclas or paddle2onnx cannot be imported).

Each graph runs in mixnet's own engines with mixnet's settings (:class:`mixnet_cli.engines.openvino.OpenVinoEngine`: f32,
LATENCY hint, one stream, a model with a fixed batch size per size; :class:`mixnet_cli.engines.onnxruntime.OnnxRuntimeEngine`:
intra-op threads = physical cores, sequential, no spinning), at batch sizes 1, 4 and 8, on a fixed random
input; ``--bf16`` adds OpenVINO computing in bf16 (``--precision bf16``; its answers are not held to the fp32
bound). All variants of a model are timed side by side, interleaved: in each round, for each batch size, every
(graph, engine) variant runs 3 times back to back in a shuffled order and the fastest of the 3 is the round's
sample (a burst of load from another process slows one run, not three). The report gives the median over
rounds, and its ratio to the paddle2onnx graph's median and to the fastest form's on the same
engine/model/batch size (the JSON also has the median of the per-round ratios, which pairs samples taken
within the same round). The summary ranks the forms by the geometric mean of their ratio to the fastest
form over models and batch sizes, per engine and over both.

The compute floor: the graph's float32 operations per image (2 per multiply-add of every convolution and of the
classifier, counted from the ONNX graph with merged depthwise and grouped 1x1 convolutions: the zero taps of its
merged kernels included, the zeros of dense 1x1 forms not) divided by the machine's float32 rate on the same
threads, measured at the start and at the end of the run as the fastest of 15 runs of a 2048-square matrix product in numpy (OpenBLAS), ONNX Runtime (MatMul) and OpenVINO (MatMul); the
floor takes the best of those figures. The report gives each engine's time per image at batch 1 and 8 (the
default form's and the fastest form's, median and fastest round) as a multiple of that floor.

Every variant's logits on a fixed batch of 4 random inputs are compared with the paddle2onnx graph's in the
same engine and with paddleclas's dygraph network's (computed in the paddle2onnx child): the largest absolute
difference divided by the largest reference logit (``max rel diff``). The fully random weights make a chaotic
network that amplifies float32 rounding in another order to about 1e-4 (the paddle2onnx graph itself differs
that much between OpenVINO and ONNX Runtime); a variant above 1e-3 (tests/test_graph.py's tolerance; a wrong
kernel, split or padding moves logits by 1e-1 or more) is flagged DIFFERENT. Without paddle2onnx, the default
form stands in as the reference.

    python benchmarks/graph_forms.py [--json graph_forms.json] [--quick] [--rounds N] [--budget S] [--all-forms]
                                     [--bf16] [--models MixNet_S ...]

The markdown report goes to stdout, progress to stderr, the raw results (every sample's summary, each
variant's ratios and logit differences) to ``--json``. Each model gets up to 9 rounds (``--rounds``), fewer
(never under 3) when the whole run would otherwise pass ``--budget`` seconds (default 660, about 11 minutes on
2 cores; each model's share of the time is in proportion to its FLOPs times its number of graphs).
``--quick`` (MixNet_S only, 2 rounds) is a smoke test of about 2 minutes.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

from _common import MODELS, ROOT, fastest_ms, log, machine, summary, write_json

import numpy as np

BATCH_SIZES = (1, 4, 8)
# Back-to-back runs per variant per round; the fastest is the round's sample (as in forward.py).
RUNS_PER_ROUND = 3
ROUNDS = 9  # at most; fewer where the time budget runs short, never below MIN_ROUNDS
MIN_ROUNDS = 3
QUICK_ROUNDS = 2
BUDGET_S = 660  # the whole run, paddle2onnx included: about 11 minutes
WARMUP_RUNS = 2  # per variant and batch size, before timing (OpenVINO compiles each size's model in the first)
SIZE = 224
CHECK_IMAGES = 4  # the fidelity batch: batch size 4 has its own fixed-size OpenVINO model
# Relative to the largest logit, as in tests/test_graph.py: fully random ("wild") weights make a chaotic network
# that amplifies float32 rounding in another order to about 1e-4; a wrong kernel, split or padding moves logits
# by 1e-1 or more.
SAME_MODEL = 1e-3
P2O = "paddle2onnx"
BF16 = "openvino-bf16"
# The fp32 engines; --bf16 adds OpenVINO computing in bf16 (not held to SAME_MODEL: bf16 moves logits by far more).
FP32_ENGINES = ("openvino", "onnxruntime")
ENGINES: tuple[str, ...] = FP32_ENGINES
ENGINE_TITLES = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime", BF16: "OpenVINO bf16"}
FLOOR_SIZE = 2048  # the square float32 matrix product that measures the machine's GFLOP/s
FLOOR_RUNS = 15

# paddle2onnx's graph of paddleclas's network, in a child process: paddle prints on import, sets environment
# variables and takes seconds to import, none of which belongs in the process that times the engines.
_P2O_CHILD = r"""
import json, sys, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
sys.modules.setdefault("openvino_telemetry", None)
import numpy as np
import paddle
import paddle2onnx
from paddleclas.ppcls.arch.backbone.model_zoo import mixnet

paddle.set_device("cpu")
work = Path(sys.argv[1])
check = np.load(work / "check.npy")
for name in sys.argv[2:]:
    out = work / name
    state = dict(np.load(out / "state.npz"))
    network = getattr(mixnet, name)()
    missing, unexpected = network.set_state_dict({k: v.astype(np.float32) for k, v in state.items()})
    if missing or unexpected:
        raise SystemExit(f"{name}: the state dict does not fit paddleclas's network: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    network.eval()
    with paddle.no_grad():
        # Before to_static, which replaces the network's forward in place.
        np.save(out / "paddle_logits.npy", network(paddle.to_tensor(check)).numpy())
    spec = paddle.static.InputSpec([None, 3, %(size)d, %(size)d], "float32", "x")
    static = paddle.jit.to_static(network, input_spec=[spec], full_graph=True)
    paddle.jit.save(static, str(out / "inference"))
    program = out / "inference.json"
    if not program.is_file():  # paddle with the old IR writes .pdmodel
        program = out / "inference.pdmodel"
    # optimize_tool="None": the default (polygraphy) pip-installs packages into the running environment.
    paddle2onnx.export(str(program), str(out / "inference.pdiparams"), str(out / "p2o.onnx"), opset_version=13,
                       optimize_tool="None")
    if not (out / "p2o.onnx").is_file():
        raise SystemExit(f"{name}: paddle2onnx wrote no model")
    print(f"{name}: paddle2onnx graph written", file=sys.stderr, flush=True)
""" % {"size": SIZE}


class Variant:
    """One graph in one engine."""

    def __init__(self, graph: str, engine: str, run: Callable[[np.ndarray], np.ndarray], detail: str) -> None:
        self.graph = graph
        self.engine = engine
        self.run = run
        self.detail = detail

    @property
    def key(self) -> str:
        return f"{self.engine}: {self.graph}"


def forms_for(model: str, all_forms: bool, candidates: bool = False) -> list[Any]:
    from mixnet_cli.network.onnx_graph import EVERY_GROUP, GraphForm

    if candidates:  # the previous default form and the leaders of a full run, every model
        return [GraphForm(), GraphForm(fold_batch_norm=True), GraphForm(dense_pointwise_below=16),
                GraphForm(dense_pointwise_below=16, fold_batch_norm=True)]

    forms = [GraphForm(merge_depthwise=m, group_pointwise=g, fold_batch_norm=f)
             for m, g, f in itertools.product((True, False), repeat=3)]
    # Mixed 1x1 layers whose groups take fewer than 16 inputs (one AVX-512 register of float32) as dense
    # block-diagonal convolutions, which both engines' blocked kernels take; every one of them dense (S only).
    forms += [GraphForm(dense_pointwise_below=16), GraphForm(dense_pointwise_below=16, fold_batch_norm=True)]
    if all_forms or model == "MixNet_S":
        return forms + [GraphForm(dense_pointwise_below=EVERY_GROUP)]
    return [form for form in forms if form.group_pointwise]


def form_name(form: Any) -> str:
    """A short name: ``dw merged, 1x1 grouped, bn kept``."""
    return form.label.replace("depthwise", "dw").replace("batch norm", "bn")


def paddle2onnx_missing() -> str | None:
    for module in ("paddle", "paddleclas", "paddle2onnx"):
        if find_spec(module) is None:
            return module
    return None


def make_p2o_graphs(models: list[str], states: dict[str, dict[str, np.ndarray]], check: np.ndarray,
                    work: Path) -> tuple[dict[str, Path], dict[str, np.ndarray], str | None]:
    """paddle2onnx's graph and paddle's logits on ``check`` per model, or a note saying why there are none."""
    missing = paddle2onnx_missing()
    if missing is not None:
        return {}, {}, f"paddle2onnx column skipped: {missing} is not importable in {sys.executable}"
    np.save(work / "check.npy", check)
    for model in models:
        (work / model).mkdir(parents=True, exist_ok=True)
        np.savez(work / model / "state.npz", **states[model])
    env = dict(os.environ)
    env["POLYGRAPHY_AUTOINSTALL_DEPS"] = "0"  # no pip run in the child could install anything
    env["PIP_NO_INDEX"] = "1"
    for name in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        env.pop(name, None)
    env.setdefault("GLOG_minloglevel", "2")
    env["HOME"] = str(work / "paddle-home")  # paddle writes under ~/.cache
    log(f"paddle2onnx: converting {', '.join(models)} in a child process...")
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", _P2O_CHILD, str(work), *models], env=env, cwd=str(work),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               errors="replace")
    if completed.returncode != 0:
        tail = [line for line in completed.stderr.strip().splitlines() if line.strip()][-1:] or ["no message"]
        return {}, {}, f"paddle2onnx column skipped: the conversion failed ({tail[0][:300]})"
    log(f"paddle2onnx: done in {time.perf_counter() - started:.0f} s")
    return ({model: work / model / "p2o.onnx" for model in models},
            {model: np.load(work / model / "paddle_logits.npy") for model in models}, None)


def relative_difference(got: np.ndarray, reference: np.ndarray) -> float:
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.abs(np.asarray(got, dtype=np.float64) - reference).max() / np.abs(reference).max())


def build_variants(model: str, graphs: dict[str, Path], work: Path, threads: int,
                   engines: tuple[str, ...]) -> list[Variant]:
    import openvino

    from mixnet_cli.engines.onnxruntime import OnnxRuntimeEngine
    from mixnet_cli.engines.openvino import OpenVinoEngine

    core = openvino.Core()  # one for all of the model's graphs (no compiled-model cache: each compiles once)
    variants = []
    for index, (graph, path) in enumerate(graphs.items()):
        cache = work / model / f"openvino-{index}"  # the fixed-batch copies of this graph
        cache.mkdir(parents=True, exist_ok=True)
        ov = OpenVinoEngine(path, "cpu", threads, cache_dir=cache, core=core)
        variants.append(Variant(graph, "openvino", ov.run, ov.detail))
        ort = OnnxRuntimeEngine(path, "cpu", threads)
        variants.append(Variant(graph, "onnxruntime", ort.run, ort.detail))
        if BF16 in engines:
            bf16_cache = work / model / f"openvino-bf16-{index}"
            bf16_cache.mkdir(parents=True, exist_ok=True)
            half = OpenVinoEngine(path, "cpu", threads, cache_dir=bf16_cache, core=core, precision="bf16")
            variants.append(Variant(graph, BF16, half.run, half.detail))
    return variants


def graph_flop(model: Any) -> int:
    """Floating-point operations of one image through ``model`` as its engines run it: 2 per multiply-add of every
    Conv (zeros of merged or block-diagonal kernels included) and of the Gemm; the elementwise work is left out."""
    import onnx
    from onnx import shape_inference

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    inferred = shape_inference.infer_shapes(fixed)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            total += 2 * math.prod(shapes[node.output[0]]) * math.prod(weights[node.input[1]][1:])
        elif node.op_type == "Gemm":
            total += 2 * math.prod(weights[node.input[1]])
    return total


def measure_floor(threads: int) -> dict[str, float]:
    """The machine's float32 GFLOP/s on ``threads`` threads: the fastest of FLOOR_RUNS interleaved runs of a
    FLOOR_SIZE-square matrix product in numpy (its OpenBLAS, on all the threads it starts with), ONNX Runtime
    (MatMul, MLAS) and OpenVINO (MatMul, oneDNN), each library's best figure."""
    import onnxruntime
    import openvino
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    a = rng.standard_normal((FLOOR_SIZE, FLOOR_SIZE), dtype=np.float32)
    b = rng.standard_normal((FLOOR_SIZE, FLOOR_SIZE), dtype=np.float32)
    shape = [FLOOR_SIZE, FLOOR_SIZE]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    core = openvino.Core()
    with tempfile.TemporaryDirectory(prefix="mixnet-floor-") as scratch:
        path = Path(scratch) / "matmul.onnx"
        path.write_bytes(model.SerializeToString())
        compiled = core.compile_model(str(path), "CPU",
                                      {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                       "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    runs: dict[str, Callable[[], Any]] = {"numpy": lambda: a @ b, "onnxruntime": lambda: session.run(None, {"a": a}),
                                          "openvino": lambda: request.infer({0: a})}
    best = {name: math.inf for name in runs}
    for _ in range(FLOOR_RUNS):
        for name, run in runs.items():
            best[name] = min(best[name], fastest_ms(run, 1))
    return {name: 2 * FLOOR_SIZE ** 3 / (ms / 1000) / 1e9 for name, ms in best.items()}


def paired_ratio(samples: list[float], reference: list[float]) -> float:
    """The median over rounds of the per-round ratio (in the JSON only: a check on the ratio of medians)."""
    return statistics.median(a / b for a, b in zip(samples, reference))


def measure_model(model: str, plan: Callable[[float, float], int], all_forms: bool | str, p2o_path: Path | None,
                  paddle_logits: np.ndarray | None, state: dict[str, np.ndarray], check: np.ndarray, work: Path,
                  threads: int) -> dict[str, Any]:
    """Build, check and time every variant of ``model``; ``plan(setup_s, round_s)`` says how many rounds."""
    import onnx

    from mixnet_cli.network.architecture import architecture_of
    from mixnet_cli.network.onnx_graph import DEFAULT_FORM, GraphForm, build_onnx

    architecture = architecture_of(model)
    forms = forms_for(model, all_forms is True, all_forms == "candidates")
    graphs: dict[str, Path] = {}
    nodes: dict[str, int] = {}
    setup = time.perf_counter()
    log(f"{model}: writing {len(forms)} graph forms...")
    for index, form in enumerate(forms):
        path = work / model / f"form-{index}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        proto = build_onnx(architecture, state, size=SIZE, form=form)
        nodes[form_name(form)] = len(proto.graph.node)
        onnx.save(proto, str(path))
        graphs[form_name(form)] = path
    if p2o_path is not None:
        graphs[P2O] = p2o_path
        nodes[P2O] = len(onnx.load(str(p2o_path)).graph.node)
    log(f"{model}: compiling {len(graphs)} graphs x {len(ENGINES)} engines...")
    variants = build_variants(model, graphs, work, threads, ENGINES)
    # Counted on grouped 1x1 convolutions, whatever the default: the zeros of a dense form are not work the network
    # needs, and the floor stays the same from one form to the next.
    flop = graph_flop(build_onnx(architecture, state, size=SIZE, form=GraphForm()))

    # Equivalence: every variant's logits against the reference graph (paddle2onnx's, else the default form) in
    # the same engine, against it in ONNX Runtime, and against paddleclas's dygraph network.
    outputs = {v.key: np.asarray(v.run(check), dtype=np.float32) for v in variants}
    reference_graph = P2O if p2o_path is not None else form_name(DEFAULT_FORM)
    fidelity = {}
    for v in variants:
        got = outputs[v.key]
        entry = {"vs_reference_same_engine": relative_difference(got, outputs[f"{v.engine}: {reference_graph}"]),
                 "vs_reference_on_onnxruntime": relative_difference(got, outputs[f"onnxruntime: {reference_graph}"])}
        if paddle_logits is not None:
            entry["vs_paddle_dygraph"] = relative_difference(got, paddle_logits)
        entry["same_model"] = v.engine == BF16 or max(entry.values()) <= SAME_MODEL
        fidelity[v.key] = entry

    rng = np.random.default_rng(0)
    inputs = {b: rng.uniform(-2.1, 2.6, (b, 3, SIZE, SIZE)).astype(np.float32) for b in BATCH_SIZES}
    for variant in variants:  # sizes ascending: OpenVINO compiles each size's fixed-batch model at its first run
        for batch in BATCH_SIZES:
            variant.run(inputs[batch])
    warm = time.perf_counter()
    for _ in range(WARMUP_RUNS - 1):
        for variant in variants:
            for batch in BATCH_SIZES:
                variant.run(inputs[batch])
    # The later warm-up passes are what a round does, WARMUP_RUNS - 1 instead of RUNS_PER_ROUND times.
    rounds = plan(time.perf_counter() - setup, (time.perf_counter() - warm) * RUNS_PER_ROUND / max(1, WARMUP_RUNS - 1))
    log(f"{model}: ready to time after {time.perf_counter() - setup:.0f} s; {rounds} rounds")
    samples: dict[str, dict[int, list[float]]] = {v.key: {b: [] for b in BATCH_SIZES} for v in variants}
    order = random.Random(1)
    started = time.perf_counter()
    for round_index in range(rounds):
        for batch in BATCH_SIZES:
            shuffled = list(variants)
            order.shuffle(shuffled)
            for variant in shuffled:
                samples[variant.key][batch].append(fastest_ms(lambda: variant.run(inputs[batch]), RUNS_PER_ROUND))
        log(f"{model}: round {round_index + 1}/{rounds} ({time.perf_counter() - started:.0f} s, "
            f"load {os.getloadavg()[0]:.2f})")

    rows = []
    for engine in ENGINES:
        for batch in BATCH_SIZES:
            mine = [v for v in variants if v.engine == engine]
            form_keys = [v.key for v in mine if v.graph != P2O]
            fastest = min(form_keys, key=lambda k: statistics.median(samples[k][batch]))
            for v in mine:
                got = samples[v.key][batch]
                row = {"engine": engine, "batch_size": batch, "graph": v.graph, "nodes": nodes[v.graph],
                       "detail": v.detail, **{f"{k}_ms": x for k, x in summary(got).items() if k != "n"},
                       "samples": len(got), "samples_ms": [round(x, 3) for x in got],
                       "ratio_to_fastest_form": statistics.median(got) / statistics.median(samples[fastest][batch]),
                       "paired_ratio_to_fastest_form": paired_ratio(got, samples[fastest][batch]),
                       "fastest_form": v.key == fastest,
                       **fidelity[v.key]}
                if p2o_path is not None:
                    p2o = samples[f"{engine}: {P2O}"][batch]
                    row["ratio_to_paddle2onnx"] = statistics.median(got) / statistics.median(p2o)
                    row["paired_ratio_to_paddle2onnx"] = paired_ratio(got, p2o)
                rows.append(row)
    return {"forms": [form_name(f) for f in forms], "rounds": rounds, "fidelity_reference": reference_graph,
            "rows": rows, "graph_flop": flop, "architecture_flop": 2 * architecture.flops(SIZE)}


def _cell(row: dict[str, Any], has_p2o: bool) -> str:
    ratios = f"{row['ratio_to_paddle2onnx']:.2f}, " if has_p2o else ""
    mark = "**" if row["fastest_form"] else ""
    return f"{mark}{row['median_ms']:.1f}{mark} ({ratios}{row['ratio_to_fastest_form']:.2f})"


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def overall(results: dict[str, Any], default: str) -> tuple[list[str], dict[str, Any]]:
    """Geometric means of each form's ratio to the fastest form, per engine, over the forms every model in
    ``results`` ran."""
    common = [f for f in next(iter(results.values()))["forms"] if all(f in r["forms"] for r in results.values())]
    scores: dict[str, dict[str, float]] = {}
    for form in common:
        scores[form] = {}
        for engine in ENGINES:
            ratios = [r["ratio_to_fastest_form"] for res in results.values() for r in res["rows"]
                      if r["graph"] == form and r["engine"] == engine]
            scores[form][engine] = geometric_mean(ratios)
        scores[form]["both"] = geometric_mean([scores[form][e] for e in FP32_ENGINES])
        p2o = [r["ratio_to_paddle2onnx"] for res in results.values() for r in res["rows"]
               if r["graph"] == form and "ratio_to_paddle2onnx" in r and r["engine"] in FP32_ENGINES]
        if p2o:
            scores[form]["vs_paddle2onnx"] = geometric_mean(p2o)
    scope = ", ".join(results)
    bf16 = BF16 in ENGINES
    lines = [f"## {scope}, {len(common)} forms: geometric mean over models and batch sizes of the ratio to the "
             "fastest form", "",
             "| form | OpenVINO | ONNX Runtime | both engines (fp32) | vs paddle2onnx (both engines) |"
             + (" OpenVINO bf16 |" if bf16 else ""),
             "|---|---|---|---|---|" + ("---|" if bf16 else "")]
    for form in sorted(common, key=lambda f: scores[f]["both"]):
        s = scores[form]
        name = f"{form} (default)" if form == default else form
        p2o = f"{s['vs_paddle2onnx']:.3f}" if "vs_paddle2onnx" in s else "–"
        lines.append(f"| {name} | {s['openvino']:.3f} | {s['onnxruntime']:.3f} | {s['both']:.3f} | {p2o} |"
                     + (f" {s[BF16]:.3f} |" if bf16 else ""))
    best = {engine: min(common, key=lambda f: scores[f][engine]) for engine in (*ENGINES, "both")}
    lines += ["", f"Fastest form: OpenVINO — {best['openvino']}; ONNX Runtime — {best['onnxruntime']}; "
              f"both engines together — {best['both']}."]
    if default in scores:
        lines.append(f"The default form ({default}) is {scores[default]['both'] / scores[best['both']]['both']:.3f}x "
                     f"the time of the best form over both engines "
                     f"(OpenVINO {scores[default]['openvino'] / scores[best['openvino']]['openvino']:.3f}x, "
                     f"ONNX Runtime {scores[default]['onnxruntime'] / scores[best['onnxruntime']]['onnxruntime']:.3f}x "
                     "of each engine's best).")
    return lines, {"common_forms": common, "scores": scores, "best": best}


def floor_gflops(meta: dict[str, Any]) -> tuple[float, str]:
    """The best GFLOP/s any library reached in the floor measurements, and which library it was."""
    figures = [(gflops, name) for measured in meta["floor"].values() for name, gflops in measured.items()]
    return max(figures)


def floor_lines(results: dict[str, Any], default: str, meta: dict[str, Any]) -> list[str]:
    """Each engine's time per image against the compute floor: the graph's FLOPs at the machine's GFLOP/s."""
    gflops, library = floor_gflops(meta)
    numpy_gflops = max(measured["numpy"] for measured in meta["floor"].values())
    measured = "; ".join(f"{when}: " + ", ".join(f"{name} {value:.0f}" for name, value in figures.items())
                         for when, figures in meta["floor"].items())
    lines = ["## Distance to the compute floor", "",
             f"Floor: the graph's float32 operations (2 per multiply-add of every convolution and the classifier, "
             f"zero taps of merged kernels included) at the machine's float32 rate on {meta['threads']} thread(s): "
             f"the fastest {FLOOR_SIZE}-square matrix product of {FLOOR_RUNS} ({measured} GFLOP/s, measured at the "
             f"start and the end of this run). The floor uses the best figure, {gflops:.0f} GFLOP/s ({library}); "
             f"numpy's OpenBLAS ({numpy_gflops:.0f}) is given for comparison. Median: median over rounds; best: the "
             "fastest round (the figure least moved by other processes on a shared machine).", "",
             "| model | GFLOP/image (graph / network) | engine | batch | default form ms/image: median, best "
             "| x floor (median, best) | x numpy floor (median) | fastest form | its ms/image: median, best "
             "| x floor (median, best) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, result in results.items():
        floor_ms = result["graph_flop"] / (gflops * 1e9) * 1000
        numpy_ms = result["graph_flop"] / (numpy_gflops * 1e9) * 1000
        for engine in ENGINES:
            for batch in (1, BATCH_SIZES[-1]):
                rows = [r for r in result["rows"] if r["engine"] == engine and r["batch_size"] == batch
                        and r["graph"] != P2O]
                mine = next(r for r in rows if r["graph"] == default)
                best = min(rows, key=lambda r: r["median_ms"])
                per = {key: (r["median_ms"] / batch, r["min_ms"] / batch) for key, r in (("d", mine), ("b", best))}
                lines.append(
                    f"| {model} | {result['graph_flop'] / 1e9:.3f} / {result['architecture_flop'] / 1e9:.3f} "
                    f"| {ENGINE_TITLES[engine]} | {batch} | {per['d'][0]:.2f}, {per['d'][1]:.2f} "
                    f"| {per['d'][0] / floor_ms:.2f}, {per['d'][1] / floor_ms:.2f} | {per['d'][0] / numpy_ms:.2f} "
                    f"| {best['graph']} | {per['b'][0]:.2f}, {per['b'][1]:.2f} "
                    f"| {per['b'][0] / floor_ms:.2f}, {per['b'][1] / floor_ms:.2f} |")
    return lines + [""]


def markdown(results: dict[str, Any], note: str | None, default: str,
             meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    has_p2o = note is None
    rounds = ", ".join(f"{model} {result['rounds']}" for model, result in results.items())
    loads = [", ".join(f"{x:.2f}" for x in values)
             for values in (meta["machine"]["load_average"], meta["load_average_at_end"])]
    lines = ["# ONNX graph forms: forward-pass latency", "",
             f"{meta['machine']['cpu']}, {meta['threads']} thread(s); rounds: {rounds}; each sample the best of "
             f"{RUNS_PER_ROUND} back-to-back runs; load average {loads[0]} → {loads[1]}; "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), ""]
    if note:
        lines += [f"**Note: {note}.** Ratios are to the fastest form only.", ""]
    legend = ("Cells: median ms over rounds (ratio to the paddle2onnx graph's median, ratio to the fastest form's "
              "median), same engine and batch size; bold: the fastest form." if has_p2o else
              "Cells: median ms over rounds (ratio to the fastest form's median), same engine and batch size; bold: "
              "the fastest form.")
    lines += [legend, "`max rel diff`: largest |logit difference| / largest |reference logit| on a fixed batch of "
              f"{CHECK_IMAGES} random inputs: vs the " + ("paddle2onnx graph" if has_p2o else "default form")
              + " in the same engine (OpenVINO / ONNX Runtime)" + (" / vs paddleclas's dygraph network (worse engine)"
                                                                    if has_p2o else "")
              + f"; **DIFFERENT** above {SAME_MODEL:g}. The weights are fully random (tests/weightgen.py, wild=True), "
              "a chaotic network that amplifies float32 rounding to about 1e-4; a wrong kernel or split moves logits "
              "by 1e-1 or more.", ""]
    for model, result in results.items():
        by = {(r["engine"], r["graph"], r["batch_size"]): r for r in result["rows"]}
        graphs = list(dict.fromkeys(r["graph"] for r in result["rows"]))
        lines += [f"## {model}", "",
                  "| graph | nodes | max rel diff (" + " / ".join(ENGINE_TITLES[e] for e in ENGINES)
                  + (" / paddle" if has_p2o else "") + ") | " + " | ".join(
                      f"{ENGINE_TITLES[e]} b{b}" for e in ENGINES for b in BATCH_SIZES) + " |",
                  "|---|---|---|" + "---|" * (len(ENGINES) * len(BATCH_SIZES))]
        for graph in graphs:
            rows = [by[(e, graph, b)] for e in ENGINES for b in BATCH_SIZES]
            same = {e: max(r["vs_reference_same_engine"] for r in rows if r["engine"] == e) for e in ENGINES}
            diff_text = " / ".join(f"{same[e]:.0e}" for e in ENGINES)
            if "vs_paddle_dygraph" in rows[0]:
                diff_text += f" / {max(r['vs_paddle_dygraph'] for r in rows):.0e}"
            if not all(r["same_model"] for r in rows):
                diff_text += " **DIFFERENT**"
            name = f"{graph} (default)" if graph == default else graph
            lines.append(f"| {name} | {rows[0]['nodes']} | {diff_text} | "
                         + " | ".join(_cell(r, has_p2o) for r in rows) + " |")
        reference = result["fidelity_reference"]
        floor = max(by[("openvino", reference, b)]["vs_reference_on_onnxruntime"] for b in BATCH_SIZES)
        lines += ["", f"The {result['fidelity_reference']} graph itself differs between OpenVINO and ONNX Runtime by "
                  f"{floor:.1e} (float32 rounding in another order, amplified by the random weights).", ""]
    lines += floor_lines(results, default, meta)
    summary_lines, scores = overall(results, default)
    lines += summary_lines
    everything = {"all models": scores}
    for model, result in results.items():
        if len(results) > 1 and len(result["forms"]) > len(scores["common_forms"]):
            more_lines, everything[model] = overall({model: result}, default)
            lines += [""] + more_lines
    return "\n".join(lines) + "\n", everything


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--rounds", type=int, help=f"rounds per model, at most (default {ROUNDS}, {QUICK_ROUNDS} with "
                        f"--quick); at least {MIN_ROUNDS} unless fewer are asked for")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds for the whole run (default {BUDGET_S}): fewer rounds where it runs short; "
                        "0: no limit")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="default: all three (MixNet_S with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"MixNet_S only, {QUICK_ROUNDS} rounds: a smoke test")
    parser.add_argument("--all-forms", action="store_true", help="all forms for M and L too (longer)")
    parser.add_argument("--candidates", action="store_true",
                        help="only the default form, batch norm folded, and the two dense-narrow-1x1 forms, every model")
    parser.add_argument("--bf16", action="store_true",
                        help="also time every graph in OpenVINO computing in bf16 (on a CPU with native bf16)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    models = args.models or (["MixNet_S"] if args.quick else list(MODELS))
    fewest = min(rounds, MIN_ROUNDS)

    sys.path.insert(0, str(ROOT / "tests"))
    import weightgen

    from mixnet_cli.network.architecture import architecture_of
    from mixnet_cli.engines.base import physical_cores
    from mixnet_cli.network.onnx_graph import DEFAULT_FORM

    global ENGINES
    if args.bf16:
        ENGINES = (*ENGINES, BF16)
    threads = physical_cores()
    at_start = machine()
    log("measuring the machine's float32 GFLOP/s...")
    floor = {"start": measure_floor(threads)}
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="mixnet-graph-forms-"))
    try:
        states = {model: weightgen.random_state(model, wild=True) for model in models}
        check = np.random.default_rng(123).uniform(-2.1, 2.6, (CHECK_IMAGES, 3, SIZE, SIZE)).astype(np.float32)
        p2o_paths, paddle_logits, note = make_p2o_graphs(models, states, check, work)
        if note:
            log(note)
        # Each model's share of the time left: its FLOPs times its number of graphs.
        which: bool | str = "candidates" if args.candidates else args.all_forms
        cost = {m: architecture_of(m).flops() * (len(forms_for(m, args.all_forms, args.candidates)) + bool(p2o_paths))
                for m in models}

        def planner(model: str) -> Callable[[float, float], int]:
            def plan(setup_s: float, round_s: float) -> int:
                if args.budget <= 0:
                    return rounds
                later = models[models.index(model) + 1:]
                reserve = sum(setup_s * cost[m] / cost[model] for m in later) + 10.0  # their setup; the report
                left = started + args.budget - time.time() - reserve
                share = left * cost[model] / (cost[model] + sum(cost[m] for m in later))
                return max(fewest, min(rounds, int(share // round_s)))
            return plan

        results = {}
        for model in models:
            results[model] = measure_model(model, planner(model), which, p2o_paths.get(model),
                                           paddle_logits.get(model), states[model], check, work, threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor["end"] = measure_floor(threads)
    seconds = time.time() - started
    versions = {}
    for package in ("openvino", "onnxruntime", "onnx", "paddlepaddle", "paddleclas", "paddle2onnx"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    meta = {"machine": at_start, "versions": versions, "load_average_at_end": list(os.getloadavg()),
            "max_rounds": rounds,
            "budget_s": args.budget, "runs_per_round": RUNS_PER_ROUND, "threads": threads, "floor": floor}
    text, scores = markdown(results, note, form_name(DEFAULT_FORM), meta)
    text += f"\nTotal {seconds:.0f} s.\n"
    sys.stdout.write(text)
    if args.json:
        write_json(args.json, {**meta, "seconds": seconds, "batch_sizes": list(BATCH_SIZES),
                               "default_form": form_name(DEFAULT_FORM), "paddle2onnx_note": note,
                               "overall": scores, "models": results})
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
