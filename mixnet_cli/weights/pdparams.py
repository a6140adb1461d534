"""Read PaddlePaddle ``.pdparams`` files without letting them run code.

A ``.pdparams`` file is a Python pickle, and ``pickle.load`` (which is all ``paddle.load`` does) runs whatever
callable a crafted file names. This reader is an allow-list, in the spirit of ``torch.load(weights_only=True)``:

* only the exact globals that files written by paddle 2.x and 3.x use (protocols 2 to 4, numpy 1 and numpy 2
  spellings) resolve, each to a guard that checks its arguments before anything is built;
* every opcode that calls something other than those guards (``BUILD`` on arbitrary objects, ``NEWOBJ``,
  ``INST``, ``OBJ``, extension codes, persistent ids) is refused, and ``BUILD`` is only accepted on a fresh
  numpy array or dtype with a state of exactly the shape numpy itself writes, so no object array (and no dtype
  flag trick) can be made;
* the whole file must be one pickle: trailing bytes mean it is not what it claims to be.

It subclasses the pure-Python unpickler because the C one offers no hook on ``BUILD`` or ``REDUCE``; the files
are a handful of large byte strings, so the cost is a few milliseconds. There is deliberately no fallback to
``pickle.load`` or ``paddle.load``.
"""

from __future__ import annotations

import io
import math
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..base.errors import UnsafeWeightsError, WeightsError

# Keys paddle adds beside the parameters: name-mapping metadata and the index of big arrays split in pieces.
_STRUCTURE_KEY = "StructuredToParameterName@@"
_BIG_PARAM_KEY = "UnpackBigParamInfor@@"

# What numpy's own pickles of plain numeric arrays contain, and nothing more. Long doubles are left out: their
# layout depends on the platform that wrote them.
_DTYPE_CODES = frozenset(
    {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"}
)
_MAX_DIMS = 32
# What a weights file is, in the words of every message that says a file is not one.
WHAT = "pickled state dict (.pdparams)"
# The pickle protocols the files open with (PROTO and its number): paddle writes 2 to 4, Python's own 5.
_PROTOCOLS = frozenset(bytes([n]) for n in range(2, pickle.HIGHEST_PROTOCOL + 1))
_DAMAGED = f"is damaged: it begins as a {WHAT} but its data is malformed"

try:  # numpy 2 spelling first: touching numpy.core warns there
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct  # type: ignore[attr-defined]


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` in the pickle: it can be passed to ``_reconstruct`` but not called."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayToken()


def _safe_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype(code, False, True)`` for the plain numeric codes numpy writes; anything else is refused."""
    if not args or len(args) > 3 or not isinstance(args[0], str) or args[0] not in _DTYPE_CODES:
        raise UnsafeWeightsError(f"refuses numpy.dtype{args!r:.80} (only plain numeric dtypes are weights)")
    if any(not isinstance(flag, bool) for flag in args[1:]):
        raise UnsafeWeightsError("refuses numpy.dtype with non-boolean options")
    # copy=True as numpy itself asks: BUILD then sets the byte order, and must not change numpy's shared
    # built-in dtype for the whole process.
    return np.dtype(args[0], align=False, copy=True)


def _reconstruct(cls: Any, shape: Any = None, typecode: Any = None, *rest: Any) -> np.ndarray:
    # numpy always writes _reconstruct(ndarray, (0,), b'b') and fills the array in by BUILD.
    if cls is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b") or rest:
        raise UnsafeWeightsError("refuses a numpy _reconstruct call that numpy itself never writes")
    return _numpy_reconstruct(np.ndarray, (0,), b"b")


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol 2 pickles carry bytes as ``_codecs.encode(str, 'latin1')``; nothing else is needed.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeWeightsError(f"refuses _codecs.encode with encoding {encoding!r:.40}")
    return text.encode("latin1")


def _ordered_dict(*args: Any) -> OrderedDict:
    # Old paddle wrote state dicts as ``OrderedDict()`` filled by SETITEMS; an argument would be a mapping
    # or pairs, harmless, but real files never pass one.
    if args:
        raise UnsafeWeightsError("refuses an OrderedDict built from arguments")
    return OrderedDict()


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("collections", "OrderedDict"): _ordered_dict,
}
_CALLABLE: frozenset[int] = frozenset(id(v) for v in _ALLOWED.values() if v is not _NDARRAY)


def _check_array_state(state: Any) -> None:
    """Exactly ``(1, shape, dtype, is_fortran, raw bytes)`` of a plain numeric array whose bytes fill it."""
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
        raise UnsafeWeightsError("refuses an array state numpy never writes")
    _, shape, dtype, fortran, raw = state
    if (
        not isinstance(shape, tuple)
        or len(shape) > _MAX_DIMS
        or any(type(d) is not int or d < 0 for d in shape)
    ):
        raise UnsafeWeightsError(f"refuses an array of shape {shape!r:.80}")
    if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None \
            or dtype.kind not in "biufc":
        raise UnsafeWeightsError(f"refuses an array of dtype {dtype!r:.80} (only numeric arrays are weights)")
    if not isinstance(fortran, bool):
        raise UnsafeWeightsError("refuses an array state numpy never writes")
    if not isinstance(raw, bytes):
        raise UnsafeWeightsError("refuses an array whose data is not raw bytes (objects, not numbers)")
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise WeightsError(f"is not a {WHAT}: an array's data does not match its shape")


def _check_dtype_state(state: Any) -> None:
    """What numpy writes for a plain numeric dtype: only the byte order may vary."""
    if not (
        isinstance(state, tuple)
        and len(state) == 8
        and state[0] == 3
        and state[1] in ("<", ">", "|", "=")
        and state[2:] == (None, None, None, -1, -1, 0)
    ):
        raise UnsafeWeightsError(f"refuses a dtype state numpy never writes ({state!r:.80})")


def _refuse(what: str) -> Callable[[Any], None]:
    def refuse(self: Any) -> None:
        raise UnsafeWeightsError(f"refuses the pickle operation {what}: real weights files never use it")

    return refuse


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self._built: set[int] = set()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeWeightsError(
                f"refuses to load {module:.80}.{name:.80}: real weights files never contain it"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeWeightsError("refuses persistent references: real weights files never contain them")

    def load_reduce(self) -> None:
        stack = self.stack  # type: ignore[attr-defined]
        args = stack.pop()
        func = stack[-1]
        if id(func) not in _CALLABLE or not isinstance(args, tuple):
            raise UnsafeWeightsError(f"refuses to call {func!r:.80}: only numpy's array rebuilders may be called")
        stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce  # type: ignore[assignment]

    def load_build(self) -> None:
        stack = self.stack  # type: ignore[attr-defined]
        state = stack.pop()
        inst = stack[-1]
        # Each array and dtype is filled in once, when fresh: a second BUILD could change what arrays already
        # built from it mean.
        if id(inst) in self._built:
            raise UnsafeWeightsError("refuses to rebuild an object twice")
        if type(inst) is np.ndarray and inst.shape == (0,):
            _check_array_state(state)
        elif isinstance(inst, np.dtype):
            _check_dtype_state(state)
        else:
            raise UnsafeWeightsError(f"refuses to set the state of a {type(inst).__name__:.80}")
        inst.__setstate__(state)
        self._built.add(id(inst))

    dispatch[pickle.BUILD[0]] = load_build  # type: ignore[assignment]

    for _name in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"):
        _code = getattr(pickle, _name, None)
        if _code is not None:
            dispatch[_code[0]] = _refuse(_name)
    del _name, _code

    def frame_leftover(self) -> bool:
        """Whether the last frame holds bytes after the STOP opcode."""
        frame = getattr(getattr(self, "_unframer", None), "current_frame", None)
        return frame is not None and bool(frame.read(1))


def _merge_split_arrays(raw: dict[str, Any]) -> dict[str, Any]:
    """Join arrays that protocol 2/3 files split into ``key@@.0``, ``key@@.1``... (paddle's big-param format)."""
    info = raw.pop(_BIG_PARAM_KEY, None)
    if not info:
        return raw
    if not isinstance(info, dict):
        raise WeightsError(f"is not a {WHAT}: its index of split arrays ({_BIG_PARAM_KEY}) is malformed")
    for key, meta in info.items():
        try:
            parts = [raw.pop(part) for part in meta["slices"]]
            if not parts or not all(isinstance(p, np.ndarray) for p in parts):
                raise TypeError("slices are not arrays")
            merged = np.concatenate([p.ravel() for p in parts])
            raw[key] = merged.reshape(tuple(int(d) for d in meta["OriginShape"]))
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"is not a {WHAT}: its split array {key!r:.80} is malformed") from None
    return raw


def read_state_dict(data: bytes | Path | str) -> dict[str, np.ndarray]:
    """Parse a ``.pdparams`` file (path or bytes) into ``{parameter name: numpy array}``.

    Raises :class:`UnsafeWeightsError` for anything a real weights file would not contain and
    :class:`WeightsError` for anything that is not a weights pickle at all.
    """
    payload = data if isinstance(data, bytes) else Path(data).read_bytes()
    if not payload:
        raise WeightsError(f"is empty (0 bytes), not a {WHAT}")
    if payload[:1] != pickle.PROTO or payload[1:2] not in _PROTOCOLS:
        # Every pickle paddle writes opens with its protocol: anything else is some other file, and the
        # unpickler's complaint about it (an unknown opcode, an empty stack) would mean nothing to the reader.
        raise WeightsError(f"is not a {WHAT}: its first bytes are not a pickle's")
    stream = io.BytesIO(payload)
    unpickler = _RestrictedUnpickler(stream)
    try:
        raw = unpickler.load()
    except WeightsError:
        raise
    except RecursionError:
        raise WeightsError(f"is not a {WHAT}: it is nested too deeply") from None
    except EOFError:
        raise WeightsError("is truncated (the file ends before its weights do)") from None
    except pickle.UnpicklingError as exc:
        if "truncated" in str(exc) or "exhausted" in str(exc):
            raise WeightsError("is truncated (the file ends before its weights do)") from None
        raise WeightsError(_DAMAGED) from None
    except Exception:  # noqa: BLE001 (whatever the unpickler raised on bad data, the file is damaged)
        raise WeightsError(_DAMAGED) from None
    if stream.tell() != len(payload) or unpickler.frame_leftover():
        raise WeightsError(f"is not a {WHAT}: extra bytes follow the end of its data")
    if not isinstance(raw, dict):
        raise WeightsError(f"is not a {WHAT}: it holds one {type(raw).__name__}, not a dict of arrays")
    raw = dict(raw)
    raw.pop(_STRUCTURE_KEY, None)
    raw = _merge_split_arrays(raw)
    state: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise WeightsError(f"is not a {WHAT}: its entry {key!r:.80} is not an array")
        state[key] = value
    if not state:
        raise WeightsError(f"is not a {WHAT}: it holds no parameters")
    return state
