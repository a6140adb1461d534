"""mixnet-cli: classify images with PaddleClas's MixNet models.

The public Python API is what this module exports; heavy libraries (paddle, paddleclas) are imported only
when a :class:`Classifier` is created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base.errors import (
    DeviceError,
    DownloadError,
    ImageError,
    MixnetError,
    OfflineError,
    UnknownModelError,
    UsageError,
    WeightsError,
)

__version__ = "0.1.0"

__all__ = [
    "Classifier",
    "ClassificationResult",
    "Prediction",
    "MixnetError",
    "UsageError",
    "UnknownModelError",
    "ImageError",
    "DownloadError",
    "OfflineError",
    "WeightsError",
    "DeviceError",
    "__version__",
]

if TYPE_CHECKING:
    from .classifier import ClassificationResult, Classifier, Prediction


def __getattr__(name: str) -> Any:
    # Lazy, so `import mixnet_cli` (and `mixnet --help`) stay fast.
    if name in ("Classifier", "ClassificationResult", "Prediction"):
        from . import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'mixnet_cli' has no attribute {name!r}")
