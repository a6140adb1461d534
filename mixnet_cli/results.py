"""The answer for one image, as every route gives it (the local classifier, the service, ``classify --server``,
Ray): its predictions or its error, and the JSON object printed for it; and the top-k check every route applies.
Imports neither numpy nor an engine, so that the thin client (``classify --server``) builds the same rows and
clamps -k as a local run does without them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .base.errors import MixnetError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from .base.manifest import Preprocessing

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    class_id: int
    label: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"class_id": self.class_id, "label": self.label, "score": self.score}


@dataclass(frozen=True)
class ClassificationResult:
    """The answer for one input: its predictions, or the error that stopped it (never both). ``features``: the
    pooled ``1536`` float32 features the classifier read, for a classifier made with ``features=True``.

    ``cam`` (when asked for: ``classify(..., cam=True)``): the class activation map of class ``cam_class``
    (``cam_label``), a ``7 x 7`` float32 grid over the network's input crop, row 0 at the top:
    ``cam[y, x] = sum_k W[k, c] * F[k, y, x]`` over the final ``1536 x 7 x 7`` feature map ``F`` and the
    classifier's weight ``W`` (``[in, out]``), so that ``cam.mean() + bias[c]`` is the class's logit. ``photo``
    is then the decoded ``H x W x 3`` uint8 RGB photo, for :meth:`cam_at_photo_size` and :meth:`cam_overlay`.
    """

    input: str
    model: str
    predictions: tuple[Prediction, ...] = ()
    error: MixnetError | None = field(default=None, compare=False)
    features: np.ndarray | None = field(default=None, compare=False, repr=False)
    # The network the model is (MixNet_S...): the model's own name unless it is a fine-tune (``model`` is then the
    # weights' name, my_flowers-3fa2c1d).
    architecture: str | None = None
    cam: np.ndarray | None = field(default=None, compare=False, repr=False)
    cam_class: int | None = None
    cam_label: str | None = None
    photo: np.ndarray | None = field(default=None, compare=False, repr=False)
    preprocessing: Preprocessing | None = field(default=None, compare=False, repr=False)
    cam_file: str | None = None  # where its picture was written (``mixnet classify --cam``)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {
                "input": self.input,
                "model": self.model,
                "architecture": self.architecture or self.model,
                "error": {"type": type(self.error).__name__, "message": str(self.error)},
            }
        row: dict[str, Any] = {
            "input": self.input,
            "model": self.model,
            "architecture": self.architecture or self.model,
            "predictions": [p.to_dict() for p in self.predictions],
        }
        if self.features is not None:
            row["features"] = [float(value) for value in self.features]
        if self.cam is not None:
            row["cam"] = {"class_id": self.cam_class, "label": self.cam_label,
                          "grid": [[float(value) for value in line] for line in self.cam]}
            if self.photo is not None and self.preprocessing is not None:
                from .images.preprocess import crop_region

                height, width = self.photo.shape[:2]
                # Where the grid lies on the photo, for drawing it there (the service's page does).
                row["cam"]["photo_size"] = [width, height]
                row["cam"]["crop"] = [float(edge) for edge in crop_region(width, height, self.preprocessing)]
            if self.cam_file is not None:
                row["cam"]["file"] = self.cam_file
        return row

    def _with_cam(self) -> tuple[np.ndarray, np.ndarray, Preprocessing]:
        if self.cam is None or self.photo is None or self.preprocessing is None:
            raise UsageError(f"{self.input}: no class activation map; classify with cam=True")
        return self.cam, self.photo, self.preprocessing

    def cam_at_photo_size(self) -> np.ndarray:
        """:attr:`cam` over the photo: float32 ``H x W`` (the decoded photo's size), placed on the crop the network
        saw through the same resize and crop as the preprocessing, smoothly interpolated between the cells'
        centres; NaN outside the crop. Raises :class:`UsageError` for a result without a map."""
        from .images.heatmap import map_at_photo_size

        cam, photo, pre = self._with_cam()
        return map_at_photo_size(cam, photo.shape[1], photo.shape[0], pre)

    def cam_overlay(self) -> np.ndarray:
        """The picture of :attr:`cam`: the photo with the map over the crop (normalised to its own range, inferno
        colours), the rest of the photo dimmed; ``H x W x 3`` uint8 RGB, shrunk to
        :data:`~mixnet_cli.images.heatmap.MAX_OVERLAY_SIDE` on the long side. Raises :class:`UsageError` for a
        result without a map."""
        from .images.heatmap import overlay

        cam, photo, pre = self._with_cam()
        return overlay(photo, cam, pre)


DEFAULT_TOPK = 5


def check_topk(topk: int | None, num_classes: int, *, clamp: bool = True) -> int:
    """``topk``, checked: :class:`UsageError` when it is below 1; above ``num_classes``, every class, with a
    notice (as timm and transformers do; ``clamp=False`` makes it a :class:`UsageError` too, for the service,
    which answers a request that asks for more with a 400). None is the default: 5, or every class of a model
    with fewer."""
    if topk is None:
        return min(DEFAULT_TOPK, num_classes)
    if clamp and topk > num_classes:
        _log.info(f"top-k {topk} is more than the model's {num_classes} classes: giving all {num_classes}")
        return num_classes
    if not 1 <= topk <= num_classes:
        raise UsageError(f"top-k must be between 1 and {num_classes} (the model's classes), got {topk}")
    return topk
