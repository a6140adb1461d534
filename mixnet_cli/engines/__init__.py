"""The engines layer: choosing an engine and device (:mod:`.choice`), converting the network into what an engine
runs and checking it (:mod:`.conversion`), and the engines, one module each, with the table of them. It imports
:mod:`mixnet_cli.base`, :mod:`mixnet_cli.images`, :mod:`mixnet_cli.network` and :mod:`mixnet_cli.weights`.

The table: what each is, what it needs, where it runs, how
``auto`` ranks it, and which module builds it.

``--engine``'s help and check, the errors that say what to install, ``doctor``, ``auto`` and
:func:`mixnet_cli.engines.choice.create_engine` read this table. Adding an engine is one new module here (with
``resolve_device``, ``build`` and, if it can drive a GPU, ``gpu_problem``) and one :func:`register` line below.
Nothing in this file imports more than the standard library, so ``mixnet --help`` stays fast; an engine's module
is imported only when it is asked for.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class EngineInfo:
    """What an engine is, for people and for checks.

    ``name`` is what ``--engine`` takes, ``aliases`` other names it answers to; ``devices`` says where it runs,
    ``summary`` what it is, ``install`` what to run when it is missing (``extra``: mixnet-cli's extra that brings
    it, whose install line depends on where mixnet-cli came from: :meth:`install_line`), ``requires`` the modules
    it needs.
    ``cpu_rank`` and ``gpu_rank`` order it for ``auto`` (lower first; None: ``auto`` never picks it there).
    ``precisions`` are the arithmetic it offers (``--precision``; fp32 first, the only one held to the reference);
    ``compiles``: it can compile the network for ``benchmark --compile``. ``cpu_fast_with``: CPU flags on which
    ``auto`` ranks it first for fp32 when this machine's engines were not measured (``cpu_fast_note`` says why).
    ``module`` implements it: ``resolve_device(name, requested) -> DeviceChoice``, ``build(spec, weights,
    choice, threads) -> Engine`` and, with a ``gpu_rank``, ``gpu_problem() -> str | None`` (why it cannot drive
    a GPU here, None when it may; cheap: no heavy import).
    """

    name: str
    aliases: tuple[str, ...]
    devices: str
    summary: str
    install: str
    requires: tuple[str, ...]
    module: str
    cpu_rank: int | None = None
    gpu_rank: int | None = None
    precisions: tuple[str, ...] = ("fp32",)
    compiles: bool = False  # benchmark --compile: it can compile the network (torch.compile)
    # ``auto``'s rule for fp32 on the CPU when this machine has no measurement (engines/speed.py): on a CPU with
    # all these flags this engine leads, for the reason ``cpu_fast_note`` gives (measured figures).
    cpu_fast_with: tuple[str, ...] = ()
    cpu_fast_note: str = ""
    extra: str | None = None

    def install_line(self) -> str:
        """What to run to get this engine: ``install``, or the install line of mixnet-cli's ``extra`` for this copy
        (torch's says, on a machine without an NVIDIA GPU, that ONNX Runtime is faster on a CPU)."""
        from ..base.third_party import install_hint, torch_install_hint

        if self.extra == "torch":
            return torch_install_hint()
        return install_hint(self.extra) if self.extra else self.install

    def missing(self) -> str | None:
        """What is not installed for this engine (None: it can run), found without importing anything."""
        if "paddleclas" in self.requires:
            from ..base.third_party import paddle_missing

            return paddle_missing()
        from ..base.third_party import module_installed

        absent = [module for module in self.requires if not module_installed(module)]
        return f"{' and '.join(absent)}: {self.install_line()}" if absent else None

    def load(self) -> ModuleType:
        """The module that builds this engine (imported on first use)."""
        return importlib.import_module(self.module)


ENGINES: dict[str, EngineInfo] = {}


def register(info: EngineInfo) -> EngineInfo:
    """Add an engine to the table (its name and aliases must be new); returns it."""
    taken = set(ENGINES) | {alias for known in ENGINES.values() for alias in known.aliases} | {"auto"}
    clash = ({info.name} | set(info.aliases)) & taken
    if clash:
        raise ValueError(f"engine name(s) already taken: {', '.join(sorted(clash))}")
    ENGINES[info.name] = info
    return info


def engine_names() -> tuple[str, ...]:
    """What ``--engine`` takes: ``auto``, then every registered engine."""
    return ("auto",) + tuple(ENGINES)


def canonical_name(requested: str) -> str | None:
    """The engine ``requested`` names (a name or alias, any case), ``auto``, or None for an unknown name."""
    name = requested.strip().lower()
    for info in ENGINES.values():
        if name == info.name or name in info.aliases:
            return info.name
    return "auto" if name == "auto" else None


def ranked(device: str, precision: str = "fp32", compiled: bool = False) -> list[EngineInfo]:
    """The engines ``auto`` may pick for ``device`` (``cpu`` or ``gpu``) that offer ``precision`` (and compile the
    network, when ``compiled``), fastest first."""
    key = "cpu_rank" if device == "cpu" else "gpu_rank"
    return sorted((info for info in ENGINES.values() if getattr(info, key) is not None and precision in info.precisions
                   and (info.compiles or not compiled)), key=lambda i: getattr(i, key))


# ONNX Runtime first in the table on the CPU: it starts in a fifth of OpenVINO's first compile and 25-45 ms
# sooner in a cold `mixnet classify` (AVX-512 EPYC), and ran the forward pass and bulk jobs as fast or faster on the AVX2 CPUs
# measured (BENCHMARKS.md). On AVX-512 CPUs OpenVINO's f32 kernels are faster at every batch size, so there
# ``auto`` puts OpenVINO first (engines/choice.py), unless this machine's own measurement says otherwise
# (`mixnet doctor --measure`, engines/speed.py).
register(EngineInfo(
    "onnxruntime", ("ort", "onnx"), "cpu, gpu (with onnxruntime-gpu)",
    "ONNX Runtime on mixnet's ONNX graph, f32: the quickest to start, and the fastest on AVX2 CPUs "
    "(BENCHMARKS.md); CUDA with onnxruntime-gpu",
    "pip install onnxruntime", ("onnxruntime",), "mixnet_cli.engines.onnxruntime", cpu_rank=0, gpu_rank=1))
register(EngineInfo(
    "openvino", ("ov",), "cpu",
    "OpenVINO on the same graph, on the CPU (its compiled form cached after the first run): f32, the fastest on "
    "AVX-512 CPUs; bf16 (opt-in) on CPUs with bf16 arithmetic",
    "pip install openvino", ("openvino", "onnxruntime"), "mixnet_cli.engines.openvino", cpu_rank=1,
    precisions=("fp32", "bf16"), cpu_fast_with=("avx512f",),
    cpu_fast_note="0.67-0.85x ONNX Runtime's time at batch 1, 4 and 8 on an AVX-512 EPYC, BENCHMARKS.md"))
register(EngineInfo(
    "paddle", ("paddle-inference",), "cpu, gpu (with paddlepaddle-gpu)",
    "Paddle Inference on a paddle.jit.save model of paddleclas's network (oneDNN on the CPU; CUDA, TensorRT)",
    "", ("paddle", "paddleclas"), "mixnet_cli.engines.paddle_inference", cpu_rank=2, gpu_rank=2, extra="paddle"))
# PyTorch first on a GPU: the CUDA build most GPU machines already have, and the only engine here that replays the
# whole forward pass as one CUDA graph (MixNet's hundred small kernels are launch-bound). Last on the CPU: ONNX
# Runtime and OpenVINO are faster there; `auto` takes it on the CPU only for a precision the others lack.
register(EngineInfo(
    "torch", ("pytorch",), "cpu, gpu (with a CUDA build of torch)",
    "PyTorch on mixnet's network built from the architecture (no converter); CUDA graphs on a GPU; fp32, and "
    "tf32, bf16 or fp16 for benchmark",
    "", ("torch",), "mixnet_cli.engines.pytorch", cpu_rank=3, gpu_rank=0,
    precisions=("fp32", "tf32", "bf16", "fp16"), compiles=True, extra="torch"))
register(EngineInfo(
    "dygraph", ("paddle-dygraph",), "cpu, gpu (with paddlepaddle-gpu)",
    "paddleclas's network run eagerly by paddle: the reference every other engine is checked against",
    "", ("paddle", "paddleclas"), "mixnet_cli.engines.dygraph", extra="paddle"))
