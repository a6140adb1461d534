"""The weights manifest: everything known about each model, read from ``weights_manifest.json``.

The JSON file is the single source of truth (URL, checksum, size, preprocessing, metrics, source); this module
only parses and validates it into typed records, and resolves the names users type (``S``, ``mixnet_l``...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from .errors import ManifestError, UnknownModelError


@dataclass(frozen=True)
class Preprocessing:
    """PaddleClas's evaluation transform for a model: resize short side, centre crop, scale, normalise."""

    resize_short: int
    crop_size: int
    interpolation: str
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class Metrics:
    top1: float
    top5: float
    paper_top1: float
    flops_m: float
    params_m: float
    v100_trt_fp32_latency_ms: dict[str, float]


@dataclass(frozen=True)
class ArchitectureRef:
    """Which MixNet a model is: PaddleClas's block table (``s`` or ``m``) and width, read by
    :mod:`mixnet_cli.network.architecture`; ``paddleclas`` names the same network in paddleclas (``module:function``), for
    the paddle engines and the tests that check mixnet's network against it."""

    blocks: str
    width_scale: float
    paddleclas: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    url: str
    sha256: str | None
    size: int | None
    architecture: ArchitectureRef
    preprocessing: Preprocessing
    metrics: Metrics
    source: str
    # 1000 for the released models; a fine-tuned file's own count (its classifier's shape) otherwise.
    num_classes: int = 1000
    # A fine-tuned file the user gave (``--weights``): then ``url`` is that file's URI and the metrics are not its.
    custom: bool = False
    # A fine-tuned file's own name, from the file: its stem and the first 7 hex digits of its sha256
    # (``my_flowers-3fa2c1d``), so two fine-tunes of one architecture can be told apart. None for released weights.
    weights_name: str | None = None

    @property
    def display_name(self) -> str:
        """What results call this model: the released model's name (``MixNet_S``), or a fine-tune's
        ``weights_name``; ``name`` stays the architecture's."""
        return self.weights_name or self.name

    @property
    def short_name(self) -> str:
        """What people type for this model: ``S`` for ``MixNet_S``."""
        return self.name.rsplit("_", 1)[-1]

    @property
    def filename(self) -> str:
        """File name of the weights, taken from the URL (also the name looked up on mirrors)."""
        return urlsplit(self.url).path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class LabelSource:
    """Class names (``281 tabby, tabby cat`` per line) and synset ids (``n01440764``...), files in this package;
    ``source`` says where the names come from."""

    file: str
    source: str
    num_classes: int
    synsets: str


@dataclass(frozen=True)
class Manifest:
    models: dict[str, ModelSpec]
    labels: LabelSource


def _require(mapping: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in mapping:
        raise ManifestError(f"weights manifest: {where} has no '{key}'; reinstall mixnet-cli")
    value = mapping[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ManifestError(f"weights manifest: {where}.{key} has the wrong type ({type(value).__name__})")
    return value


def _parse_model(name: str, raw: dict[str, Any]) -> ModelSpec:
    where = f"models.{name}"
    url = _require(raw, "url", str, where)
    if urlsplit(url).scheme not in ("http", "https") or not url.rsplit("/", 1)[-1]:
        raise ManifestError(f"weights manifest: {where}.url is not an http(s) file URL: {url}")
    sha256 = raw.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or len(sha256) != 64
                               or any(c not in "0123456789abcdef" for c in sha256)):
        raise ManifestError(f"weights manifest: {where}.sha256 must be null or 64 lowercase hex digits")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ManifestError(f"weights manifest: {where}.size must be null or a positive integer")
    pre = _require(raw, "preprocessing", dict, where)
    pre_where = f"{where}.preprocessing"
    mean = _require(pre, "mean", list, pre_where)
    std = _require(pre, "std", list, pre_where)
    if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
        raise ManifestError(f"weights manifest: {pre_where} needs three means and three positive stds")
    preprocessing = Preprocessing(
        resize_short=_require(pre, "resize_short", int, pre_where),
        crop_size=_require(pre, "crop_size", int, pre_where),
        interpolation=_require(pre, "interpolation", str, pre_where),
        scale=float(_require(pre, "scale", (int, float), pre_where)),
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
    )
    if preprocessing.crop_size > preprocessing.resize_short:
        raise ManifestError(f"weights manifest: {pre_where}.crop_size is larger than resize_short")
    met = _require(raw, "metrics", dict, where)
    met_where = f"{where}.metrics"
    metrics = Metrics(
        top1=float(_require(met, "top1", (int, float), met_where)),
        top5=float(_require(met, "top5", (int, float), met_where)),
        paper_top1=float(_require(met, "paper_top1", (int, float), met_where)),
        flops_m=float(_require(met, "flops_m", (int, float), met_where)),
        params_m=float(_require(met, "params_m", (int, float), met_where)),
        v100_trt_fp32_latency_ms={
            str(k): float(v)
            for k, v in _require(met, "v100_trt_fp32_latency_ms", dict, met_where).items()
        },
    )
    arch = _require(raw, "architecture", dict, where)
    arch_where = f"{where}.architecture"
    architecture = ArchitectureRef(
        blocks=_require(arch, "blocks", str, arch_where),
        width_scale=float(_require(arch, "width_scale", (int, float), arch_where)),
        paddleclas=_require(arch, "paddleclas", str, arch_where),
    )
    if ":" not in architecture.paddleclas:
        raise ManifestError(f"weights manifest: {arch_where}.paddleclas must look like 'module:function'")
    return ModelSpec(
        name=name,
        url=url,
        sha256=sha256,
        size=size,
        architecture=architecture,
        preprocessing=preprocessing,
        metrics=metrics,
        source=_require(raw, "source", str, where),
    )


def parse_manifest(raw: dict[str, Any]) -> Manifest:
    """Validate a decoded manifest; raises :class:`ManifestError` naming the first bad field."""
    if not isinstance(raw, dict) or raw.get("schema_version") != 1:
        raise ManifestError("weights manifest: unknown schema_version (expected 1); reinstall mixnet-cli")
    models_raw = _require(raw, "models", dict, "manifest")
    if not models_raw:
        raise ManifestError("weights manifest: no models")
    models = {name: _parse_model(name, entry) for name, entry in models_raw.items()}
    labels_raw = _require(raw, "labels", dict, "manifest")
    labels = LabelSource(
        file=_require(labels_raw, "file", str, "labels"),
        source=_require(labels_raw, "source", str, "labels"),
        num_classes=_require(labels_raw, "num_classes", int, "labels"),
        synsets=_require(labels_raw, "synsets", str, "labels"),
    )
    return Manifest(models=models, labels=labels)


@lru_cache(maxsize=1)
def load_manifest() -> Manifest:
    """The manifest shipped inside the package (parsed once per process)."""
    text = resources.files("mixnet_cli").joinpath("weights_manifest.json").read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"weights manifest is not valid JSON ({exc}); reinstall mixnet-cli") from exc
    return parse_manifest(raw)


def model_names() -> list[str]:
    return list(load_manifest().models)


def resolve_model(name: str) -> ModelSpec:
    """Accept ``S``, ``s``, ``MixNet_S``, ``mixnet_s``, ``MIXNET-S``...; unknown names list the valid ones."""
    manifest = load_manifest()
    wanted = name.strip().lower().replace("-", "_")
    for spec in manifest.models.values():
        full = spec.name.lower()
        short = spec.short_name.lower()
        if wanted in (full, short):
            return spec
    valid = ", ".join(
        f"{spec.short_name} ({spec.name})" for spec in manifest.models.values()
    )
    guess = _closest_model(wanted, manifest)
    hint = f"did you mean {guess}? " if guess else ""
    raise UnknownModelError(f"unknown model '{name}': {hint}choose one of {valid}")


def _closest_model(wanted: str, manifest: Manifest) -> str | None:
    """The model name ``wanted`` most likely misspells (``mixnetl``, ``mixnet_x_l``, ``mixnet-ss``), or None.
    Full names only: a one-letter name is close to any other one-letter name."""
    import difflib

    squashed = {spec.name.lower().replace("_", ""): spec.name for spec in manifest.models.values()}
    match = difflib.get_close_matches(wanted.replace("_", ""), list(squashed), n=1, cutoff=0.75)
    return squashed[match[0]] if match else None
