"""``mixnet export``: a converted model written where the user asks, checked there before it takes its name.

The files are the cached conversion (:mod:`mixnet_cli.engines.conversion`), copied into a staging folder inside the
output directory, loaded back from there by an engine (:mod:`mixnet_cli.engines.choice`) and run on the test batch:
only copies that give the reference logits take their final names, so a failed export leaves nothing
half-written.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .engines.conversion import FORMATS, RECORD_NAME, ConvertedModel, check_engine, ensure_converted, reference_logits
from .base.errors import CacheError, UsageError
from .base.files import check_output_directory, kind_of_file
from .base.manifest import ModelSpec


def deployable_files(converted: ConvertedModel) -> list[str]:
    """The files a deployment needs (the model itself, not our record or check notes)."""
    return sorted(name for name in converted.files if name != RECORD_NAME and not name.startswith("checked-"))


def onnx_file_name(spec: ModelSpec) -> str:
    """The exported ONNX model's file name: the model's (``MixNet_S.onnx``, a fine-tune's
    ``my_flowers-3fa2c1d.onnx``), so that a fine-tune exported beside the released model does not replace it."""
    return f"{spec.display_name}.onnx"


def _engine_for(fmt: str, directory: Path, spec: ModelSpec) -> Any:
    if fmt == "onnx":
        from .engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(directory / onnx_file_name(spec), "cpu")
    from .engines.paddle_inference import PaddleInferenceEngine

    program = directory / "inference.json"
    if not program.is_file():
        program = directory / "inference.pdmodel"
    return PaddleInferenceEngine(program, directory / "inference.pdiparams", "cpu")


def _check_targets(out_dir: Path, names: list[str]) -> None:
    """Every file of the export can take its name: what is there already is a file (or a link) that a rename
    replaces. Checked for all of them before the first rename, so an export is written whole or not at all."""
    for name in names:
        target = out_dir / name
        try:
            mode = os.lstat(target).st_mode
        except FileNotFoundError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise UsageError(f"-o {out_dir}: {target} is {kind_of_file(target)}, where the export writes its {name}; "
                             "move it away or choose another -o")


def _write_error(out_dir: Path, exc: OSError) -> CacheError:
    """The one-line error for a write into ``out_dir`` that failed, with the advice that fits its cause."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheError(f"cannot write to {out_dir} ({reason}); free disk space or choose another -o")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheError(f"cannot write to {out_dir} ({reason}); choose a writable directory with -o")
    return CacheError(f"cannot write to {out_dir} ({reason}); choose another -o")


# The keys of an exported ONNX model's metadata_props (values are strings; lists and numbers are JSON).
ONNX_METADATA_KEYS = ("model_name", "architecture", "output", "labels", "num_classes", "preprocessing")


def onnx_metadata(spec: ModelSpec, labels: Sequence[str], *, output: str) -> dict[str, str]:
    """What an exported ONNX model says about itself in ``metadata_props``, so that a tool reading it needs no
    second file: the model's name and architecture, what its output is (``logits`` or ``probabilities``), the
    class names in class-id order (a JSON list), and the preprocessing its input expects (a JSON object: resize
    the short side to ``resize_short`` with ``interpolation``, centre crop ``crop_size``, RGB, scale, then
    ``(x - mean) / std`` per channel, CHW float32)."""
    import json

    pre = spec.preprocessing
    preprocessing = {
        "resize_short": pre.resize_short, "crop_size": pre.crop_size, "interpolation": pre.interpolation,
        "color_order": "RGB", "scale": pre.scale, "mean": list(pre.mean), "std": list(pre.std),
        "layout": "NCHW", "dtype": "float32",
    }
    return {
        "model_name": spec.display_name,
        "architecture": spec.name,
        "output": output,
        "labels": json.dumps(list(labels), ensure_ascii=False),
        "num_classes": str(spec.num_classes),
        "preprocessing": json.dumps(preprocessing),
    }


def _describe_onnx(path: Path, metadata: dict[str, str], *, with_softmax: bool) -> None:
    """Rewrite the ONNX model at ``path`` with ``metadata`` in its ``metadata_props`` and, ``with_softmax``, a
    Softmax over the classes after the logits (the output is then named ``probabilities``)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    if with_softmax:
        graph = model.graph
        logits = graph.output[0]
        graph.node.append(helper.make_node("Softmax", [logits.name], ["probabilities"], name="softmax", axis=1))
        probabilities = onnx.ValueInfoProto()
        probabilities.CopyFrom(logits)
        probabilities.name = "probabilities"
        graph.output.remove(logits)
        graph.output.insert(0, probabilities)
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def export_to_directory(spec: ModelSpec, weights_path: Path, weights_sha256: str, fmt: str,
                        out_dir: Path, *, labels: Sequence[str] | None = None,
                        with_softmax: bool = False) -> tuple[list[Path], dict[str, Any]]:
    """Write ``spec``'s model in ``fmt`` (``onnx``, ``paddle`` or ``paddle-legacy``) into ``out_dir``; returns
    the files written and the check (probability differences from the reference, and logit differences, or
    log-probability differences for a format that outputs probabilities).

    An ONNX model describes itself (:func:`onnx_metadata`, with ``labels``: the class names, default the class
    ids); ``with_softmax`` (ONNX only) ends it in a softmax, for tools that read probabilities.

    Raises :class:`EngineError` when the conversion or the check fails (a paddle format without the
    ``[paddle]`` extra included), :class:`UsageError` when ``out_dir`` is not a directory that can be written or
    something other than a file stands where a file of the export goes, :class:`CacheError` when writing fails.
    Either every file of the export takes its name or none does.
    """
    check_output_directory(out_dir)
    if with_softmax and fmt != "onnx":
        raise UsageError(f"--with-softmax is for --format onnx ({fmt} " + (
            "outputs probabilities already)" if FORMATS[fmt].outputs == "probabilities" else "outputs logits)"))
    converted = ensure_converted(spec, weights_path, weights_sha256, fmt)
    cached = deployable_files(converted)
    # the cache names the graph after the architecture; the export after the model
    names = [onnx_file_name(spec) if fmt == "onnx" and name == f"{spec.name}.onnx" else name for name in cached]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".mixnet-export-", dir=out_dir))
    except OSError as exc:
        raise _write_error(out_dir, exc) from None
    try:
        for source, name in zip(cached, names):
            shutil.copyfile(converted.directory / source, staging / name)
        outputs = FORMATS[fmt].outputs
        if fmt == "onnx":
            outputs = "probabilities" if with_softmax else "logits"
            classes = list(labels) if labels is not None else [str(i) for i in range(spec.num_classes)]
            _describe_onnx(staging / onnx_file_name(spec), onnx_metadata(spec, classes, output=outputs),
                           with_softmax=with_softmax)
        check = check_engine(_engine_for(fmt, staging, spec), spec, reference_logits(spec, converted),
                             outputs=outputs)
        check["reference"] = converted.record.get("reference", "")
        # After the check, which takes seconds: what is in the way is what the renames would meet.
        _check_targets(out_dir, names)
        written = []
        for name in names:
            os.replace(staging / name, out_dir / name)
            written.append(out_dir / name)
        return written, check
    except OSError as exc:
        raise _write_error(out_dir, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
