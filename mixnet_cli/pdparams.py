"""Read PaddlePaddle ``.pdparams`` files without letting them run code.

A ``.pdparams`` file is a Python pickle, and ``pickle.load`` (which is all ``paddle.load`` does) runs whatever
callable a crafted file names. This unpickler resolves only the exact globals that real files written by paddle
2.x and 3.x use (protocols 2 to 4, numpy 1 and numpy 2 spellings) and refuses everything else before it is
called. There is deliberately no fallback to ``pickle.load`` or ``paddle.load``.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import UnsafeWeightsError, WeightsError

# Keys paddle adds beside the parameters: name-mapping metadata and the index of big arrays split in pieces.
_STRUCTURE_KEY = "StructuredToParameterName@@"
_BIG_PARAM_KEY = "UnpackBigParamInfor@@"


def _safe_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` restricted to plain numeric types: an object dtype would let pickled objects in."""
    dtype = np.dtype(*args)
    if dtype.hasobject or dtype.kind not in "biufc":
        raise UnsafeWeightsError(f"refuses an array of dtype {dtype} (only numeric arrays are weights)")
    return dtype


try:  # numpy 2 spelling first: touching numpy.core warns there
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct


def _reconstruct(cls: Any, *args: Any) -> np.ndarray:
    if cls is not np.ndarray:
        raise UnsafeWeightsError("refuses to reconstruct anything but a numpy array")
    return _numpy_reconstruct(cls, *args)


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Protocol 2 pickles carry bytes as ``_codecs.encode(str, 'latin1')``; nothing else is needed.
    if encoding not in ("latin1", "latin-1"):
        raise UnsafeWeightsError(f"refuses _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("collections", "OrderedDict"): OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeWeightsError(
                f"refuses to load {module}.{name}: real weights files never contain it"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeWeightsError("refuses persistent references: real weights files never contain them")


def _merge_split_arrays(raw: dict[str, Any]) -> dict[str, Any]:
    """Join arrays that protocol 2/3 files split into ``key@@.0``, ``key@@.1``... (paddle's big-param format)."""
    info = raw.pop(_BIG_PARAM_KEY, None)
    if not info:
        return raw
    if not isinstance(info, dict):
        raise WeightsError(f"malformed {_BIG_PARAM_KEY} entry")
    for key, meta in info.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("slices"), list):
            raise WeightsError(f"malformed split-array entry for {key!r}")
        parts = [raw.pop(part) for part in meta["slices"]]
        merged = np.concatenate([np.asarray(p).ravel() for p in parts])
        raw[key] = merged.reshape(meta["OriginShape"])
    return raw


def read_state_dict(data: bytes | Path | str) -> dict[str, np.ndarray]:
    """Parse a ``.pdparams`` file (path or bytes) into ``{parameter name: numpy array}``.

    Raises :class:`UnsafeWeightsError` for anything a real weights file would not contain and
    :class:`WeightsError` for anything that is not a weights pickle at all.
    """
    payload = data if isinstance(data, bytes) else Path(data).read_bytes()
    try:
        raw = _RestrictedUnpickler(io.BytesIO(payload)).load()
    except WeightsError:
        raise
    except Exception as exc:  # any parse failure means "not a weights file", whatever pickle raised
        raise WeightsError(f"is not a PaddlePaddle weights file ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"is not a PaddlePaddle weights file (holds a {type(raw).__name__}, not a dict)")
    raw = dict(raw)
    raw.pop(_STRUCTURE_KEY, None)
    raw = _merge_split_arrays(raw)
    state: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise WeightsError(f"is not a PaddlePaddle weights file (entry {key!r} is not an array)")
        state[key] = value
    if not state:
        raise WeightsError("is not a PaddlePaddle weights file (it holds no parameters)")
    return state
