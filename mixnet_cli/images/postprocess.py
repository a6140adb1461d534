"""From logits to probabilities, as PaddleClas's ``Topk`` post-processing does it."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``N x C`` logits, in float64 (PaddleClas's Topk post-processing applies softmax to the
    network's logits)."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
