"""``mixnet export``: a converted model written where the user asks, checked there before it takes its name.

The files are the cached conversion (:mod:`mixnet_cli.conversion`), copied into a staging folder inside the
output directory, loaded back from there by an engine (:mod:`mixnet_cli.engine`) and run on the test batch:
only copies that give the reference logits take their final names, so a failed export leaves nothing
half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .conversion import FORMATS, RECORD_NAME, ConvertedModel, check_engine, ensure_converted, reference_logits
from .errors import CacheError
from .manifest import ModelSpec


def deployable_files(converted: ConvertedModel) -> list[str]:
    """The files a deployment needs (the model itself, not our record or check notes)."""
    return sorted(name for name in converted.files if name != RECORD_NAME and not name.startswith("checked-"))


def _engine_for(fmt: str, directory: Path, spec: ModelSpec) -> Any:
    if fmt == "onnx":
        from .engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(directory / f"{spec.name}.onnx", "cpu")
    from .engines.paddle_inference import PaddleInferenceEngine

    program = directory / "inference.json"
    if not program.is_file():
        program = directory / "inference.pdmodel"
    return PaddleInferenceEngine(program, directory / "inference.pdiparams", "cpu")


def export_to_directory(spec: ModelSpec, weights_path: Path, weights_sha256: str, fmt: str,
                        out_dir: Path) -> tuple[list[Path], dict[str, Any]]:
    """Write ``spec``'s model in ``fmt`` (``onnx``, ``paddle`` or ``paddle-legacy``) into ``out_dir``; returns
    the files written and the check (probability differences from the reference, and logit differences, or
    log-probability differences for a format that outputs probabilities).

    Raises :class:`EngineError` when the conversion or the check fails (a paddle format without the
    ``[paddle]`` extra included), :class:`CacheError` when ``out_dir`` cannot be written.
    """
    converted = ensure_converted(spec, weights_path, weights_sha256, fmt)
    names = deployable_files(converted)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".mixnet-export-", dir=out_dir))
    except OSError as exc:
        raise CacheError(f"cannot write to {out_dir} ({exc.strerror or exc}); choose a writable directory with -o") from None
    try:
        for name in names:
            shutil.copyfile(converted.directory / name, staging / name)
        check = check_engine(_engine_for(fmt, staging, spec), spec, reference_logits(spec, converted),
                             outputs=FORMATS[fmt].outputs)
        check["reference"] = converted.record.get("reference", "")
        written = []
        for name in names:
            os.replace(staging / name, out_dir / name)
            written.append(out_dir / name)
        return written, check
    except OSError as exc:
        raise CacheError(f"cannot write to {out_dir} ({exc.strerror or exc}); free disk space or choose another -o") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
