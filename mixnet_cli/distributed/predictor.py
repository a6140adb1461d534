"""The predictor that Ray's actors (and Spark's Python workers) run: the model loaded once, batches of paths,
URIs or bytes classified into result rows, never raising for a bad image; its threads and device from what Ray
assigned it.

Ray ships :class:`MixnetPredictor` to its workers by reference (this module's name), so it stays importable here."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import urlparse

from ..base.errors import ImageNotFoundError, ImageTooLargeError, ImageUnreadableError, MixnetError, UsageError
from ..images.inputs import InputItem, display_name, fetch_image_url, is_url
from ..images.preprocess import MAX_IMAGE_BYTES
from .extra import _filesystem
from .rows import canonical_key, is_uri, result_row, results_table

if TYPE_CHECKING:
    import pyarrow

    from ..classifier import ClassificationResult

_log = logging.getLogger(__name__)


_BUCKET_SCHEMES = frozenset({"s3", "gs", "gcs", "abfs", "abfss"})


def _actor_cpus() -> int | None:
    """The CPUs Ray gave this actor, rounded up (a fractional 1.5 runs 2 threads), or None outside Ray."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, math.ceil(cpus)) if cpus else None


def _ray_gpu_ids() -> list[str] | None:
    """The GPUs Ray assigned this process (its own ids), [] for none; None outside a Ray worker."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return [str(gpu) for gpu in ray.get_gpu_ids()]


def actor_device(device: str, gpu_ids: Sequence[str | int] | None, visible: str | None) -> str:
    """The device a predictor opens, under Ray's own GPU assignment.

    ``device`` as asked (``cpu``, ``gpu``, ``gpu:N``, ``auto``); ``gpu_ids`` the GPUs Ray assigned this actor
    (``ray.get_gpu_ids()``; None outside Ray); ``visible`` the ``CUDA_VISIBLE_DEVICES`` Ray left. Ray narrows
    ``CUDA_VISIBLE_DEVICES`` to the GPUs it assigns, so inside the actor the assigned GPU is number 0 whatever ``N``
    the user gave (``gpu:1`` would name a GPU the actor cannot see); where Ray leaves it alone
    (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``) the assigned id is used as it is. In Ray without a GPU
    assigned, ``auto`` is the CPU: a GPU Ray has not accounted for belongs to someone else."""
    if device == "cpu" or gpu_ids is None:
        return device
    if not gpu_ids:
        return "cpu" if device == "auto" else device
    assigned = str(gpu_ids[0])
    if visible is not None and visible.strip():
        numbers = [number.strip() for number in visible.split(",")]
        return f"gpu:{numbers.index(assigned)}" if assigned in numbers else "gpu:0"
    return f"gpu:{assigned}"


def _column(batch: Any, name: str) -> list[Any] | None:
    """One column of a batch in any of Ray Data's formats (pyarrow.Table, pandas.DataFrame, dict of arrays)."""
    if hasattr(batch, "column_names"):  # pyarrow.Table or RecordBatch
        return batch.column(name).to_pylist() if name in batch.column_names else None
    if hasattr(batch, "columns") and hasattr(batch, "to_dict"):  # pandas.DataFrame
        return list(batch[name]) if name in batch.columns else None
    return list(batch[name]) if name in batch else None


class MixnetPredictor:
    """A callable class for ``Dataset.map_batches`` (and the actors of :func:`run_job`, and Spark's
    ``mapInArrow`` through :func:`spark_classify_batches`): each loads the model once, then classifies batches.

    A batch (``pyarrow.Table``, ``pandas.DataFrame`` or dict of arrays) has a ``path`` column (str or bytes: a
    local path, an ``s3://``-style URI pyarrow opens, or an http(s) URL) and optionally ``bytes`` (the encoded
    image, as ``ray.data.read_binary_files`` gives it; then ``path`` only names it), ``input`` (the name
    written in the result; default: the path) and ``key`` (default: :func:`canonical_key` of the path). It returns
    a ``pyarrow.Table`` of :func:`result_schema`, one row per input row, in order. It never raises for a bad image:
    a missing, unreadable or corrupt file, or an unexpected failure of one image, is an error row. ``threads``
    defaults to the CPUs Ray assigned the actor; ``device`` is mapped onto the GPU Ray assigned
    (:func:`actor_device`). Other arguments are :class:`~mixnet_cli.classifier.Classifier`'s (``weights`` and
    ``labels``: your own files, at the same path on every node) and :meth:`classify_many`'s.
    """

    def __init__(
        self,
        model: str | None = "MixNet_S",
        *,
        topk: int = 5,
        batch_size: int = 4,
        device: str = "cpu",
        engine: str = "auto",
        threads: int | None = None,
        mirrors: Sequence[str] | None = None,
        offline: bool | None = None,
        weights: str | None = None,
        labels: str | None = None,
    ) -> None:
        from ..classifier import Classifier

        threads = threads or _actor_cpus()
        device = actor_device(device, _ray_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        # Progress bars from many actors would interleave in the driver's log.
        self.classifier = Classifier(model, device=device, engine=engine, threads=threads, mirrors=mirrors,
                                     offline=offline, progress=False, weights=weights, labels=labels)
        self.topk = topk
        self.batch_size = batch_size
        self.workers = max(1, threads or 2)
        self._filesystems: dict[str, Any] = {}

    def describe(self) -> dict[str, str]:
        """What made the rows, for the output files' metadata: model, weights sha256, engine, precision, device."""
        classifier = self.classifier
        return {"model": classifier.model_name, "weights_sha256": classifier.weights.record.sha256,
                "engine": classifier.engine.name, "precision": classifier.engine_choice.precision,
                "device": classifier.device_choice.device}

    def classify_batch(self, batch: Any) -> "pyarrow.Table":
        """``self(batch)``, under a name an actor method can have."""
        return self(batch)

    def _read_uri(self, uri: str, name: str) -> bytes:
        """The bytes of one file through pyarrow (its filesystem made once per bucket or host), with
        ``mixnet classify``'s size limit; errors as :class:`~mixnet_cli.base.errors.ImageError`."""
        parsed = urlparse(uri)
        key = f"{parsed.scheme}://{parsed.netloc}"
        # Object stores take "bucket/key"; filesystems with a host (hdfs://host:port/...) take the path alone.
        path = f"{parsed.netloc}{parsed.path}" if parsed.scheme in _BUCKET_SCHEMES else parsed.path
        try:
            if key not in self._filesystems:
                self._filesystems[key] = _filesystem(uri)[0]
            filesystem = self._filesystems[key]
            with filesystem.open_input_stream(path) as stream:
                data = stream.read(MAX_IMAGE_BYTES + 1)
        except FileNotFoundError:
            raise ImageNotFoundError(f"{name}: no such file; check the path") from None
        except PermissionError:
            raise ImageUnreadableError(f"{name}: permission denied; check the permissions") from None
        except (OSError, UsageError) as exc:
            raise ImageUnreadableError(f"{name}: cannot read ({exc}); check the path and credentials") from None
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageTooLargeError(f"{name}: more than {MAX_IMAGE_BYTES} bytes, over the limit for images")
        return data

    def _item(self, name: str, path: str | bytes | None, data: bytes | None) -> InputItem:
        if data is not None:
            return InputItem(name, lambda: data)
        if path is None:
            def no_path() -> bytes:
                raise ImageNotFoundError(f"{name}: the row has neither a path nor bytes")

            return InputItem(name, no_path)
        text = path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path
        if is_url(text):
            return InputItem(name, lambda: fetch_image_url(text))
        if is_uri(text):
            return InputItem(name, lambda: self._read_uri(text, name))
        local = Path(os.fsdecode(path) if isinstance(path, bytes) else path)
        return InputItem(name, lambda: local)

    def __call__(self, batch: Any) -> "pyarrow.Table":
        paths = _column(batch, "path")
        data = _column(batch, "bytes")
        names = _column(batch, "input")
        keys = _column(batch, "key")
        count = len(paths if paths is not None else data if data is not None else names or [])
        paths = paths if paths is not None else [None] * count
        data = data if data is not None else [None] * count
        texts = [p.decode("utf-8", "surrogateescape") if isinstance(p, bytes) else p for p in paths]
        if names is None:
            names = [display_name(str(text)) for text in texts]
        if keys is None:
            keys = [canonical_key(text if text is not None else name) for text, name in zip(texts, names)]
        items = [self._item(name, path, blob) for name, path, blob in zip(names, paths, data)]
        return results_table([result_row(result, key) for result, key in zip(self._classify(items), keys)])

    def _classify(self, items: list[InputItem]) -> list["ClassificationResult"]:
        try:
            return list(self.classifier.classify_many(items, topk=self.topk, batch_size=self.batch_size,
                                                      workers=self.workers))
        except Exception:  # noqa: BLE001 (a failure outside ImageError: find the image, keep the others)
            _log.warning("a batch failed as a whole; classifying its %d images one by one", len(items))
            return [self._classify_one(item) for item in items]

    def _classify_one(self, item: InputItem) -> "ClassificationResult":
        from ..classifier import ClassificationResult

        try:
            return next(iter(self.classifier.classify_many([item], topk=self.topk, batch_size=1, workers=1)))
        except Exception as exc:  # noqa: BLE001 (never raise for one image: its row carries the error)
            error = MixnetError(f"{item.name}: unexpected {type(exc).__name__}: {exc}")
            return ClassificationResult(input=item.name, model=self.classifier.model_name, error=error,
                                        architecture=self.classifier.architecture)
