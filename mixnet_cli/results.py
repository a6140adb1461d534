"""The answer for one image, as every route gives it (the local classifier, the service, ``classify --server``,
Ray): its predictions or its error, and the JSON object printed for it. Imports neither numpy nor an engine, so
that the thin client (``classify --server``) builds the same rows without them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .base.errors import MixnetError

if TYPE_CHECKING:
    import numpy as np


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
    pooled ``1536`` float32 features the classifier read, for a classifier made with ``features=True``."""

    input: str
    model: str
    predictions: tuple[Prediction, ...] = ()
    error: MixnetError | None = field(default=None, compare=False)
    features: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {
                "input": self.input,
                "model": self.model,
                "error": {"type": type(self.error).__name__, "message": str(self.error)},
            }
        row: dict[str, Any] = {
            "input": self.input,
            "model": self.model,
            "predictions": [p.to_dict() for p in self.predictions],
        }
        if self.features is not None:
            row["features"] = [float(value) for value in self.features]
        return row
