"""Converted models: made once per weights file for the engines, checked, then cached.

Layout under the cache root (the directory is named by the sha256 of the weights it was made from)::

    onnx/<weights sha256>/MixNet_S.onnx                  for OpenVINO and ONNX Runtime (written by mixnet itself)
    onnx/<weights sha256>/record.json                    what it was made from, each file's sha256
    onnx/<weights sha256>/reference.json                 ONNX Runtime's logits on the test batch (first check)
    openvino/<weights sha256>/batch1.onnx ...            the same with a fixed batch size, for OpenVINO
    openvino/<weights sha256>/compiled/                  OpenVINO's compiled-model cache
    openvino/<weights sha256>/checked-openvino.json      OpenVINO's answers passed the check (per version)
    paddle-inference/<weights sha256>/inference.json     for Paddle Inference (``paddle.jit.save``)
    paddle-inference/<weights sha256>/inference.pdiparams
    paddle-inference/<weights sha256>/record.json
    paddle-legacy/<weights sha256>/inference.pdmodel     the legacy program (:mod:`mixnet_cli.network.paddle_program`), for
    paddle-legacy/<weights sha256>/inference.pdiparams   PaddleClas's tools, Paddle Lite's opt, Paddle Inference < 3
    paddle-legacy/<weights sha256>/record.json

The ONNX model is written in this process, in well under a second, from the verified state dict and the
architecture description (:mod:`mixnet_cli.network.onnx_graph`): no paddle. The logits ONNX Runtime gives on a fixed
test batch (:func:`reference_logits`, computed on the first check and kept beside the model) are what every other
engine must reproduce before its answers are trusted (tests hold the graph itself to paddleclas's network). The Paddle Inference models need paddle and paddleclas (the
``[paddle]`` extra) and are made in a child process (``python -m mixnet_cli.engines.conversion``): paddle takes seconds
to import, prints to stdout and sets environment variables, and none of that may reach the caller; its record
keeps the logits of paddleclas's own network.

Using a cached model reads no paddle at all: the record is checked against the files (sizes and sha256), and
a mismatch (or a model made by an older mixnet-cli) converts again; a model made by a newer mixnet-cli is left
alone (:class:`NewerModelInCache`: the engine builds the network in memory, or says so). A conversion is moved into
place in one rename; a failed one leaves nothing behind. This module runs no engine of mixnet's: engines
(:mod:`mixnet_cli.engines`) run what it makes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..base import cache, files, settings
from ..base.errors import CacheError, EngineError, MixnetError
from ..base.manifest import ModelSpec, resolve_model
from ..images.postprocess import softmax

RECORD_NAME = cache.DIRECTORY_RECORD


class NewerModelInCache(CacheError):
    """The cache holds this model as a newer mixnet-cli converted it (a higher ``RECORD_VERSION``): left alone."""


# 3: the ONNX model is mixnet's own graph (2 was paddle2onnx's); 4: its narrow grouped 1x1 convolutions are dense
# (onnx_graph.DEFAULT_FORM). An older record is converted again.
RECORD_VERSION = 4
# The converted model must give the network's logits to this fraction of their largest magnitude (relative, so
# that it means the same for trained weights, whose logits reach 20, and fresh ones, whose logits are 1e-7), and
# the same probabilities to this absolute error: the bound the tests hold every engine to, and no stricter, since
# engines' kernels differ by CPU (OpenVINO's AVX-512 kernels move probabilities by ~2e-5 against ONNX Runtime on
# random weights, which a 1e-5 bound refused on AVX-512 machines while AVX2 ones passed).
LOGIT_TOLERANCE = 1e-4
PROBABILITY_TOLERANCE = 1e-4
_FAILURE_MARK = "mixnet-export-failed: "
_REPORT_NAME = "check.json"


@dataclass(frozen=True)
class ModelFormat:
    name: str  # "onnx", "paddle" or "paddle-legacy"
    directory: str  # below the cache root
    label: str  # for messages: what it is converted to
    # What the model outputs: "logits", or "probabilities" (a softmax last, as PaddleClas's own inference models
    # end, since its deploy post-processing reads probabilities).
    outputs: str = "logits"
    needs_paddle: bool = True  # made in a child process with the [paddle] extra


FORMATS: dict[str, ModelFormat] = {
    "onnx": ModelFormat("onnx", cache.CONVERTED_FOLDERS["onnx"], "ONNX", needs_paddle=False),
    "paddle": ModelFormat("paddle", cache.CONVERTED_FOLDERS["paddle"], "Paddle Inference"),
    "paddle-legacy": ModelFormat("paddle-legacy", cache.CONVERTED_FOLDERS["paddle-legacy"],
                                 "legacy Paddle Inference", outputs="probabilities"),
}


@dataclass(frozen=True)
class ConvertedModel:
    """A verified converted model in the cache: ``files`` maps each file's name to its path; ``record`` is its
    record (``reference_logits``: what every engine must reproduce on :func:`validation_batch`)."""

    format: str
    directory: Path
    files: dict[str, Path]
    record: dict[str, Any]

    def file(self, suffix: str) -> Path:
        """The file whose name ends with ``suffix`` (``.onnx``, ``.json``, ``.pdiparams``)."""
        for name, path in self.files.items():
            if name.endswith(suffix):
                return path
        raise EngineError(f"{self.directory} has no *{suffix} file; delete the directory and run again")


def _format(fmt: str) -> ModelFormat:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown export format {fmt!r}") from None


def converted_dir(fmt: str, weights_sha256: str) -> Path:
    _format(fmt)
    return cache.converted_dir(fmt, weights_sha256)


_log = logging.getLogger(__name__)


def _say(message: str) -> None:
    """A one-time notice (converting, replacing a cached model), logged at INFO."""
    _log.info(message)


def _read_record(directory: Path, name: str = RECORD_NAME) -> dict[str, Any] | None:
    return cache.read_directory_record(directory, name)


def _record_problem(record: dict[str, Any], fmt: str, spec: ModelSpec, weights_sha256: str) -> str | None:
    if (record.get("record_version"), record.get("format"), record.get("model"),
            record.get("weights_sha256")) != (RECORD_VERSION, fmt, spec.name, weights_sha256):
        return "has a record for other weights or another format"
    return None


def _problem(record: dict[str, Any] | None, fmt: str, spec: ModelSpec, weights_sha256: str, directory: Path) -> str | None:
    """Why the converted model in ``directory`` cannot be used (None when it can), every file hashed."""
    if record is not None and (problem := _record_problem(record, fmt, spec, weights_sha256)) is not None:
        return problem
    return cache.directory_problem(directory, record)


def cached_model(spec: ModelSpec, weights_sha256: str, fmt: str) -> ConvertedModel | None:
    """The verified converted model of these weights for ``fmt``, or None if there is none (or it fails its
    record). Its files are hashed when their stat differs from the one recorded when they were last hashed
    (every time with ``MIXNET_VERIFY=always``)."""
    directory = converted_dir(fmt, weights_sha256)
    if not directory.is_dir():
        return None
    record = _read_record(directory)
    if record is None or _record_problem(record, fmt, spec, weights_sha256) is not None:
        return None
    check = cache.check_directory(directory, record, full=settings.verify_mode() == "always")
    if check.problem is not None:
        return None
    if check.new_stamps:
        _restamp(directory, record, check.new_stamps)
    return ConvertedModel(fmt, directory, {name: directory / name for name in record["files"]}, record)


def _restamp(directory: Path, record: dict[str, Any], new_stamps: dict[str, dict[str, int]]) -> None:
    """Keep the stats of files just hashed and found intact in ``directory``'s record, so that the next use skips
    the hash. Best effort, under the conversion's lock and only when it is free (a process converting the same
    weights may be replacing the directory): a read-only or busy cache hashes again next time."""
    from ..base.locks import file_lock

    lock = file_lock(directory.parent / f".{directory.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Exception:  # noqa: BLE001 (filelock.Timeout, OSError: someone else holds it, or a read-only cache)
        return
    try:
        if _read_record(directory) != record:
            return  # converted again meanwhile
        files.write_text(directory / RECORD_NAME, json.dumps(cache.restamped(record, new_stamps), indent=2) + "\n")
    except OSError:
        pass
    finally:
        lock.release()


def ensure_converted(spec: ModelSpec, weights_path: Path, weights_sha256: str, fmt: str, *,
                     openvino_copy: bool = False) -> ConvertedModel:
    """The cached model of these weights for ``fmt``, converting them first (once) when there is none.

    ``openvino_copy`` (the OpenVINO engine, about to run): a conversion to ONNX also writes OpenVINO's batch-1
    copy from the model in memory; no other engine leaves anything of OpenVINO's in the cache.

    Says on stderr when it converts, and when a cached model failed its record and is made again. Raises
    :class:`EngineError` when the conversion or its check fails (or ``fmt`` needs the ``[paddle]`` extra and it
    is missing), :class:`CacheError` when the cache is not writable or holds this model as a newer mixnet-cli
    made it (left alone: two versions sharing a cache would otherwise convert again in turn).
    """
    found = cached_model(spec, weights_sha256, fmt)
    if found is not None:
        return found
    from ..base.locks import file_lock

    kind = _format(fmt)
    if kind.needs_paddle:
        from ..base.third_party import require_paddle

        require_paddle(f"the {kind.label} model")
    root = cache.ensure_dir(cache.converted_dir(fmt))
    final = root / weights_sha256
    try:
        lock = file_lock(root / f".{weights_sha256}.lock")
        lock.acquire()
    except OSError as exc:
        raise CacheError(f"cannot lock {root} ({exc}); set MIXNET_HOME to a writable directory") from None
    try:
        # Another process may have converted while this one waited for the lock.
        found = cached_model(spec, weights_sha256, fmt)
        if found is not None:
            return found
        if final.exists():
            record = _read_record(final)
            newer = record.get("record_version") if record is not None else None
            if isinstance(newer, int) and newer > RECORD_VERSION:
                # Two versions of mixnet-cli sharing one cache (two environments, one MIXNET_HOME): replacing the
                # newer one's model would make each convert again every time the other ran. Left as it is; the
                # engine builds the network in memory for this run, or says this.
                message = (f"cached {kind.label} model {final} was made by a newer mixnet-cli (record {newer}; "
                           f"this one writes {RECORD_VERSION}) and is left as it is: upgrade mixnet-cli, or give "
                           "this one a cache of its own (MIXNET_HOME)")
                raise NewerModelInCache(message)
            if record is not None and record.get("record_version") != RECORD_VERSION:
                _say(f"cached {kind.label} model {final} was made by an older mixnet-cli; replacing it")
            else:
                problem = _problem(record, fmt, spec, weights_sha256, final)
                _say(f"cached {kind.label} model {final} {problem}; converting again")
            shutil.rmtree(final, ignore_errors=True)
        if fmt == "onnx":
            # OpenVINO's fixed-batch copies and compiled blobs were made from the ONNX model being replaced.
            shutil.rmtree(openvino_dir(weights_sha256), ignore_errors=True)
        # Holding the lock, any unfinished directory of these weights belongs to a process that died.
        for leftover in root.glob(f".{weights_sha256}.*.incomplete"):
            shutil.rmtree(leftover, ignore_errors=True)
        _say(f"converting {spec.name} to {kind.label} (once)...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{weights_sha256}.", suffix=".incomplete", dir=root))
        try:
            if fmt == "onnx":
                try:
                    report = convert_onnx(spec, weights_path, tmp, openvino_copy=openvino_dir(weights_sha256)
                                          if openvino_copy else None)
                except MixnetError as exc:
                    if isinstance(exc, EngineError):
                        raise
                    raise EngineError(f"converting {spec.name} to ONNX failed ({exc})") from None
            else:
                report = _convert_in_child(spec, weights_path, fmt, tmp)
                (tmp / _REPORT_NAME).unlink(missing_ok=True)
            file_entries = {path.name: cache.file_entry(path) for path in sorted(tmp.iterdir()) if path.is_file()}
            record = {
                "record_version": RECORD_VERSION,
                "format": fmt,
                "model": spec.name,
                # A fine-tune's own name (None: released weights), for `cache list`.
                "weights_name": spec.weights_name,
                "weights_sha256": weights_sha256,
                "files": file_entries,
                # Every engine that runs these files is held to the reference logits (reference_logits())
                # before its answers are trusted.
                "reference_logits": report.get("reference_logits"),
                "reference": report.get("reference", ""),
                "versions": report.get("versions", {}),
                "created_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            }
            (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            files.adopt_directory(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as exc:
        if isinstance(exc, CacheError):  # a CacheError is an OSError: raised above, with its own words
            raise
        raise CacheError(
            f"cannot write the {kind.label} model under {root} ({exc.strerror or exc}); "
            "free disk space or set MIXNET_HOME to a writable directory"
        ) from None
    finally:
        lock.release()
    found = cached_model(spec, weights_sha256, fmt)
    if found is None:
        raise EngineError(f"the {kind.label} model written to {final} does not match its record; delete it and run again")
    return found


def openvino_dir(weights_sha256: str) -> Path:
    """OpenVINO's own cache of compiled models for these weights (it writes and checks the files there)."""
    return cache.converted_dir("openvino", weights_sha256)


def fixed_batch_onnx(source: Path, directory: Path, batch_size: int) -> Path:
    """``source`` (a checked ONNX model) with its batch dimension fixed to ``batch_size``, made once into
    ``directory``: OpenVINO runs fixed shapes faster. Only the declared input and output shapes change."""
    target = directory / f"batch{batch_size}.onnx"
    if target.is_file():
        return target
    import onnx

    _save_onnx(_with_batch_size(onnx.load(str(source)), batch_size), target)
    return target


def _with_batch_size(model: Any, batch_size: int) -> Any:
    """``model`` (changed in place) with its declared input and output batch dimension fixed."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_value = batch_size  # replaces the symbolic name (a oneof)
    return model


def _save_onnx(model: Any, path: Path) -> None:
    """Write an ONNX model under its final name only once it is whole (readers never see half a file)."""
    files.write_bytes(path, model.SerializeToString())


def engine_checked(directory: Path, engine: str, version: str) -> bool:
    """Whether ``engine`` at ``version`` already passed :func:`check_engine` on the model cached in ``directory``."""
    try:
        raw = json.loads((directory / f"checked-{engine}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("version") == version


def mark_engine_checked(directory: Path, engine: str, version: str, check: dict[str, Any]) -> None:
    """Remember that ``engine`` passed its check (best effort: a read-only cache checks again next time)."""
    try:
        files.write_text(directory / f"checked-{engine}.json",
                         json.dumps({"engine": engine, "version": version, "check": check}, indent=2) + "\n")
    except OSError:
        pass


def _child_environment() -> dict[str, str]:
    env = dict(os.environ)
    # Nothing mixnet runs may install packages (paddle2onnx's optimiser once did, through polygraphy): no pip run
    # inside the child could reach an index.
    env["POLYGRAPHY_AUTOINSTALL_DEPS"] = "0"
    env["PIP_NO_INDEX"] = "1"
    for name in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        env.pop(name, None)
    env.setdefault("GLOG_minloglevel", "2")
    # paddle writes under ~/.cache (its dataset folder on import, to_static_tmp when saving): keep it in our cache.
    env["MIXNET_HOME"] = str(cache.cache_root())  # the child must not derive it from the HOME set below
    env["HOME"] = str(cache.engine_home("paddle"))
    return env


def _convert_in_child(spec: ModelSpec, weights_path: Path, fmt: str, out: Path) -> dict[str, Any]:
    package_parent = str(Path(__file__).resolve().parents[2])  # the folder that holds mixnet_cli/
    # The current directory could hold another copy of the package; the one running now is the one to use.
    bootstrap = (
        "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
        f"sys.path.append({package_parent!r}); "
        "from mixnet_cli.engines.conversion import _child_main; sys.exit(_child_main(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", bootstrap, "--model", spec.name, "--weights", str(weights_path),
               "--format", fmt, "--out", str(out), "--num-classes", str(spec.num_classes)]
    completed = subprocess.run(command, env=_child_environment(), stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, errors="replace")
    log = (completed.stdout or "") + (completed.stderr or "")
    if settings.debug():
        sys.stderr.write(log)
    if completed.returncode != 0:
        lines = [line.strip() for line in log.splitlines() if line.strip()]
        marked = [line[len(_FAILURE_MARK):] for line in lines if line.startswith(_FAILURE_MARK)]
        reason = marked[-1] if marked else (lines[-1] if lines else f"exit code {completed.returncode}")
        raise EngineError(
            f"converting {spec.name} to {_format(fmt).label} failed ({reason[:300]}); "
            "rerun with MIXNET_DEBUG=1 to see the converter's log, or use --engine dygraph"
        )
    try:
        report = json.loads((out / _REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise EngineError(f"converting {spec.name} to {_format(fmt).label} gave no check report; run again") from None
    return report if isinstance(report, dict) else {}


# ---------------------------------------------------------------------------------------------------------------
# Checks: the fixed test batch, and how close an engine's logits must be to the reference.


def validation_batch(size: int, count: int = 2, seed: int = 0) -> np.ndarray:
    """A fixed test batch in the range of normalised pixels (about -2.1 to 2.6)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-2.1, 2.6, size=(count, 3, size, size)).astype(np.float32)


def _check_bounds(what: str, difference: float, allowed: float, probability_difference: float) -> None:
    """Raise :class:`EngineError` naming each bound that ``difference`` (in ``what``) or the probabilities passed."""
    failed = []
    if difference > allowed:
        failed.append(f"its {what} differ from the reference by up to {difference:.3g} (allowed {allowed:.3g})")
    if probability_difference > PROBABILITY_TOLERANCE:
        failed.append(f"its probabilities differ by up to {probability_difference:.3g} "
                      f"(allowed {PROBABILITY_TOLERANCE:.3g})")
    if failed:
        raise EngineError("the model does not give the reference answers: " + "; ".join(failed))


def compare_logits(got: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How far ``got`` is from ``reference``; raises :class:`EngineError` beyond the tolerances."""
    if got.shape != reference.shape:
        raise EngineError(f"the converted model gives logits of shape {got.shape}, expected {reference.shape}")
    if not np.all(np.isfinite(got)):
        raise EngineError("the converted model gives non-finite logits")
    logit_diff = float(np.abs(got.astype(np.float64) - reference).max())
    prob_diff = float(np.abs(softmax(got) - softmax(reference)).max())
    scale = float(np.abs(reference).max())
    _check_bounds("logits", logit_diff, LOGIT_TOLERANCE * scale + 1e-30, prob_diff)
    return {"max_abs_logit_diff": logit_diff, "max_abs_probability_diff": prob_diff, "logit_scale": scale}


# A model that outputs probabilities is held to the reference logits through their logarithm, on every class whose
# probability float32 still holds; float32 rounds a log-probability to about 1e-7, whatever the logits' scale, so
# the allowance never falls below LOGIT_TOLERANCE.
_SMALLEST_PROBABILITY = 1e-30


def compare_probabilities(got: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How far ``got`` (probabilities) is from the softmax of ``reference`` (logits): in probabilities, and in
    log-probabilities (which differ from the logits by a constant per row) wherever the reference's probability is
    above 1e-30. Raises :class:`EngineError` beyond the tolerances."""
    if got.shape != reference.shape:
        raise EngineError(f"the converted model gives probabilities of shape {got.shape}, expected {reference.shape}")
    if not np.all(np.isfinite(got)) or got.min() < 0:
        raise EngineError("the converted model gives probabilities that are negative or not finite")
    shifted = reference - reference.max(axis=1, keepdims=True)
    log_reference = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    kept = log_reference > np.log(_SMALLEST_PROBABILITY)
    with np.errstate(divide="ignore"):
        log_got = np.log(np.where(kept, got.astype(np.float64), 1.0))
    log_diff = float(np.abs(log_got - np.where(kept, log_reference, 0.0)).max())
    prob_diff = float(np.abs(got.astype(np.float64) - np.exp(log_reference)).max())
    scale = float(np.abs(reference).max())
    allowed = LOGIT_TOLERANCE * max(scale, 1.0)
    _check_bounds("log-probabilities", log_diff, allowed, prob_diff)
    return {"max_abs_log_probability_diff": log_diff, "max_abs_probability_diff": prob_diff, "logit_scale": scale}


def _versions(*packages: str) -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def check_engine(engine: Any, spec: ModelSpec, reference_logits: Any, *, whole_batch: bool = True,
                 outputs: str = "logits") -> dict[str, Any]:
    """Run ``engine`` on the test batch and compare with the network's own logits (raises :class:`EngineError`).

    ``whole_batch=False`` runs the images one at a time only (for an engine whose batch size is fixed per model).
    ``outputs="probabilities"``: the engine's model ends in a softmax (:func:`compare_probabilities`).
    """
    try:
        reference = np.asarray(reference_logits, dtype=np.float64)
        if reference.ndim != 2 or len(reference) < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise EngineError(f"there are no reference logits of {spec.name} to check against; convert again") from None
    compare = compare_probabilities if outputs == "probabilities" else compare_logits
    batch = validation_batch(spec.preprocessing.crop_size, count=len(reference))
    single = compare(np.concatenate([engine.run(batch[i:i + 1]) for i in range(len(batch))]), reference)
    check: dict[str, Any] = dict(single)
    if whole_batch:
        # Two batch sizes: the batch dimension must have stayed dynamic through the conversion.
        whole = compare(engine.run(batch), reference)
        check = {key: max(whole[key], single[key]) for key in whole}
    sizes = f"{len(batch)} and 1" if whole_batch else "1"
    check["inputs"] = f"{len(batch)} uniform random images at batch size {sizes}"
    check["tolerances"] = {"logits_relative": LOGIT_TOLERANCE, "probabilities": PROBABILITY_TOLERANCE}
    return check


def _onnx_model(spec: ModelSpec, weights_path: Path, *, features: bool = False, feature_map: bool = False) -> Any:
    from ..network.architecture import architecture_for
    from ..network.onnx_graph import build_onnx
    from ..weights.pdparams import read_state_dict

    architecture = architecture_for(spec)
    state = read_state_dict(weights_path)
    architecture.check_state_dict(state)
    return build_onnx(architecture, state, spec.preprocessing.crop_size, check=False, features=features,
                      feature_map=feature_map)


def onnx_bytes(spec: ModelSpec, weights_path: Path, *, features: bool = False, feature_map: bool = False) -> bytes:
    """The ONNX model of these (verified) weights, serialised, built in memory: for a cache that cannot be
    written, and (``features``, ``feature_map``) the models that also output the pooled features or the final
    feature map. Raises :class:`WeightsError` when the file does not hold ``spec``'s parameters."""
    return bytes(_onnx_model(spec, weights_path, features=features, feature_map=feature_map).SerializeToString())


def convert_onnx(spec: ModelSpec, weights_path: Path, out: Path, *, openvino_copy: Path | None = None) -> dict[str, Any]:
    """Write ``{out}/{spec.name}.onnx`` from the weights (no paddle, no engine); returns the conversion's
    report. Its reference logits are computed when an engine is first checked (:func:`reference_logits`), so
    that the one-time work of a first run can overlap with the engine's own start (engine.py).

    ``openvino_copy``: also write the batch-1 copy OpenVINO's engine makes on first use into that directory,
    from the model already in memory (saves it parsing the file again on a first run)."""
    model = _onnx_model(spec, weights_path)
    (out / f"{spec.name}.onnx").write_bytes(model.SerializeToString())
    if openvino_copy is not None:
        try:
            openvino_copy.mkdir(parents=True, exist_ok=True)
            _save_onnx(_with_batch_size(model, 1), openvino_copy / "batch1.onnx")
        except OSError:
            pass  # the engine makes it itself, or runs the dynamic model
    return {
        "reference": ONNX_REFERENCE,
        "versions": _versions("onnx", "numpy", "mixnet-cli"),
    }


ONNX_REFERENCE = "ONNX Runtime (CPU) on this graph"
_REFERENCE_FILE = "reference.json"


def reference_logits(spec: ModelSpec, converted: ConvertedModel) -> np.ndarray:
    """The logits every engine running ``converted`` must give on :func:`validation_batch` (``N x 1000``
    float64): paddleclas's network's for the Paddle Inference model (kept in its record), ONNX Runtime's on the
    CPU for the ONNX model, computed once and kept beside it (best effort: a read-only cache computes them each
    time). Raises :class:`EngineError` when ONNX Runtime cannot run the model."""
    if converted.record.get("reference_logits") is not None:
        return np.asarray(converted.record["reference_logits"], dtype=np.float64)
    model = converted.file(".onnx")
    model_sha256 = converted.record["files"][model.name]["sha256"]
    saved = _read_record(converted.directory, _REFERENCE_FILE)
    if saved is not None and saved.get("model_sha256") == model_sha256:
        try:
            logits = np.asarray(saved["logits"], dtype=np.float64)
            if logits.shape == (len(validation_batch(spec.preprocessing.crop_size)), spec.num_classes):
                return logits
        except (KeyError, TypeError, ValueError):
            pass
    reference = onnx_runtime_logits(spec, model)
    try:
        files.write_text(converted.directory / _REFERENCE_FILE, json.dumps(
            {"model_sha256": model_sha256, "reference": ONNX_REFERENCE, "logits": reference.tolist()}) + "\n")
    except OSError:
        pass
    return reference


def onnx_runtime_logits(spec: ModelSpec, model: Path | bytes) -> np.ndarray:
    """ONNX Runtime's logits (CPU, float64 ``N x classes``) for ``model`` (a file, or a serialised graph built in
    memory) on :func:`validation_batch`: the reference of the engines that run mixnet's own graph. Raises
    :class:`EngineError` when ONNX Runtime cannot run it."""
    from ..base.third_party import import_quietly

    onnxruntime = import_quietly("onnxruntime")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # One thread, no spinning: on a first run this overlaps with OpenVINO's compile (engines/openvino.py), which
    # should keep the other core.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = onnxruntime.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                               providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {session.get_inputs()[0].name: validation_batch(spec.preprocessing.crop_size)})
    except Exception as exc:  # onnxruntime raises its own exception types
        where = "the graph built in memory" if isinstance(model, bytes) else str(model)
        raise EngineError(f"ONNX Runtime cannot run {where} ({str(exc).splitlines()[0][:200]}); "
                          f"run `mixnet cache rm {spec.short_name}` to convert it again") from None
    return np.asarray(logits, dtype=np.float64)


def convert_paddle(spec: ModelSpec, weights_path: Path, out: Path) -> dict[str, Any]:
    """Write the Paddle Inference model (``inference.json`` + ``inference.pdiparams``) into ``out``, in this
    process; returns the conversion's report, whose ``reference_logits`` are paddleclas's network's on
    :func:`validation_batch`. Imports paddle and paddleclas: :func:`ensure_converted` runs this in a child
    process."""
    from ..weights.pdparams import read_state_dict

    state = read_state_dict(weights_path)
    paddle, network, reference = _paddleclas_reference(spec, state)  # before to_static, which changes the network
    size = spec.preprocessing.crop_size
    input_spec = paddle.static.InputSpec([None, 3, size, size], "float32", "x")
    static = paddle.jit.to_static(network, input_spec=[input_spec], full_graph=True)
    paddle.jit.save(static, str(out / "inference"))
    program = out / "inference.json"
    if not program.is_file():  # paddle with the old IR writes .pdmodel
        program = out / "inference.pdmodel"
    if not program.is_file() or not (out / "inference.pdiparams").is_file():
        raise EngineError("paddle.jit.save wrote no inference model")
    return _paddle_report(reference)


def convert_paddle_legacy(spec: ModelSpec, weights_path: Path, out: Path) -> dict[str, Any]:
    """Write the legacy Paddle inference model (``inference.pdmodel`` + ``inference.pdiparams``, softmax last)
    into ``out``, in this process, from the architecture description (:mod:`mixnet_cli.network.paddle_program`); returns
    the conversion's report, whose ``reference_logits`` are paddleclas's network's on :func:`validation_batch`.
    Imports paddle and paddleclas: :func:`ensure_converted` runs this in a child process."""
    from ..network.architecture import architecture_for
    from ..network.paddle_program import write_legacy_model
    from ..weights.pdparams import read_state_dict

    state = read_state_dict(weights_path)
    _, _, reference = _paddleclas_reference(spec, state)  # checks the state dict against the architecture
    written = write_legacy_model(architecture_for(spec), state, out / "inference", spec.preprocessing.crop_size)
    if not all(path.is_file() for path in written):
        raise EngineError("paddle.static.save_inference_model wrote no inference model")
    return _paddle_report(reference)


def _paddleclas_reference(spec: ModelSpec, state: dict[str, np.ndarray]) -> tuple[Any, Any, np.ndarray]:
    """paddle, paddleclas's network loaded with ``state`` (checked), and its logits on :func:`validation_batch`."""
    from ..network.paddle_network import load_network
    from ..base.third_party import import_quietly

    paddle = import_quietly("paddle")
    paddle.set_device("cpu")
    network = load_network(spec, state)
    with paddle.no_grad():
        reference = network(paddle.to_tensor(validation_batch(spec.preprocessing.crop_size))).numpy()
    return paddle, network, reference.astype(np.float64)


def _paddle_report(reference: np.ndarray) -> dict[str, Any]:
    return {
        "reference_logits": reference.tolist(),
        "reference": "paddleclas's dygraph network",
        "versions": _versions("paddlepaddle", "paddlepaddle-gpu", "paddleclas", "mixnet-cli"),
    }


_CONVERTERS = {"paddle": convert_paddle, "paddle-legacy": convert_paddle_legacy}


def _child_main(argv: Sequence[str]) -> int:
    import argparse  # only in the child process: the cached path does not pay for it

    parser = argparse.ArgumentParser(prog="python -m mixnet_cli.engines.conversion", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--weights", required=True, type=Path)
    parser.add_argument("--format", required=True, choices=sorted(_CONVERTERS))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        spec = resolve_model(args.model)
        if args.num_classes != spec.num_classes:
            spec = replace(spec, num_classes=args.num_classes, custom=True)
        report = _CONVERTERS[args.format](spec, args.weights, args.out)
        (args.out / _REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except MixnetError as exc:
        print(f"{_FAILURE_MARK}{exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # noqa: BLE001 (anything the converters raise is reported as one line)
        import traceback

        traceback.print_exc()
        print(f"{_FAILURE_MARK}{type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
