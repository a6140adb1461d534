"""The safe ``.pdparams`` reader: real paddle files load, hostile pickles are refused before anything runs."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import pickletools
import struct
import subprocess
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mixnet_cli.base.errors import UnsafeWeightsError, WeightsError
from mixnet_cli.weights.pdparams import read_state_dict


@pytest.fixture(scope="module")
def paddle_files(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """A small layer's state dict written with protocols 2, 3 and 4: by paddle itself where it is installed,
    else as the test weights are written (``weightgen.save_pdparams``, shown to equal paddle's format below)."""
    from mixnet_cli.base.third_party import paddle_missing

    directory = tmp_path_factory.mktemp("paddle-protocols")
    files = {}
    if paddle_missing() is None:
        import paddle

        paddle.seed(1)
        layer = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.Linear(4, 2))
        for protocol in (2, 3, 4):
            path = directory / f"layer-p{protocol}.pdparams"
            paddle.save(layer.state_dict(), str(path), protocol=protocol)
            files[protocol] = path
        return files
    from weightgen import save_pdparams

    rng = np.random.default_rng(1)
    state = {"0.weight": rng.normal(size=(4, 3, 3, 3)), "0.bias": rng.normal(size=4), "1.weight": np.ones(4),
             "1.bias": np.zeros(4), "1._mean": np.zeros(4), "1._variance": np.ones(4),
             "2.weight": rng.normal(size=(4, 2)), "2.bias": np.zeros(2)}
    for protocol in (2, 3, 4):
        files[protocol] = save_pdparams({k: v.astype(np.float32) for k, v in state.items()},
                                        directory / f"layer-p{protocol}.pdparams", protocol)
    return files


@pytest.mark.paddle
@pytest.mark.parametrize("protocol", [2, 4])
def test_test_weights_are_in_paddles_own_format(tmp_path, protocol):
    """The files the tests make load with ``paddle.load`` into paddleclas's network, and paddle's own save of
    that network reads back identically with mixnet's reader."""
    import paddle
    from paddleclas.ppcls.arch.backbone.model_zoo.mixnet import MixNet_S

    from weightgen import make_random_weights

    ours = make_random_weights("MixNet_S", tmp_path / "ours.pdparams")
    if protocol == 2:
        from weightgen import random_state, save_pdparams

        ours = save_pdparams(random_state("MixNet_S"), tmp_path / "ours.pdparams", protocol=2)
    network = MixNet_S(pretrained=False, class_num=1000)
    network.set_state_dict(paddle.load(str(ours)))
    paddle.save(network.state_dict(), str(tmp_path / "theirs.pdparams"), protocol=protocol)
    mine, theirs = read_state_dict(ours), read_state_dict(tmp_path / "theirs.pdparams")
    assert mine.keys() == theirs.keys()
    for key in mine:
        np.testing.assert_array_equal(mine[key], theirs[key])


def _trusted_load(path: Path) -> dict[str, np.ndarray]:
    """What plain pickle makes of a file we wrote ourselves (the reference for values)."""
    raw = pickle.loads(path.read_bytes())
    raw.pop("StructuredToParameterName@@", None)
    return raw


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_files_written_by_paddle_load_with_their_values(paddle_files, protocol):
    path = paddle_files[protocol]
    state = read_state_dict(path)
    reference = _trusted_load(path)
    assert state.keys() == reference.keys() and len(state) == 8
    for key, value in reference.items():
        assert state[key].dtype == value.dtype and state[key].shape == value.shape
        np.testing.assert_array_equal(state[key], value)
    assert read_state_dict(path.read_bytes()).keys() == state.keys()


def _without_frames_respelled(data: bytes, old: str, new: str) -> bytes:
    """Re-emit a protocol-4 pickle op by op, dropping FRAME (optional) and rewriting one short string."""
    ops = list(pickletools.genops(data))
    out = bytearray()
    for index, (opcode, arg, pos) in enumerate(ops):
        end = ops[index + 1][2] if index + 1 < len(ops) else pos + 1
        if opcode.name == "FRAME":
            continue
        if opcode.name == "SHORT_BINUNICODE" and arg == old:
            encoded = new.encode()
            out += b"\x8c" + bytes([len(encoded)]) + encoded
            continue
        out += data[pos:end]
    return bytes(out)


def test_numpy2_spelling_of_a_paddle_file_loads(paddle_files):
    data = paddle_files[4].read_bytes()
    respelled = _without_frames_respelled(data, "numpy.core.multiarray", "numpy._core.multiarray")
    assert b"numpy._core.multiarray" in respelled and b"numpy.core.multiarray" not in respelled
    state = read_state_dict(respelled)
    for key, value in _trusted_load(paddle_files[4]).items():
        np.testing.assert_array_equal(state[key], value)


def test_big_endian_arrays_keep_their_values():
    big_endian = _Built(np.dtype, ("f4", False, True), (3, ">", None, None, None, -1, -1, 0))
    array = _Built(np.core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                   (1, (2,), big_endian, False, b"\x3f\x80\x00\x00\x40\x00\x00\x00"))
    state = read_state_dict(pickle.dumps({"w": array}, protocol=2))
    np.testing.assert_array_equal(state["w"], [1.0, 2.0])
    # the file must not have changed numpy's shared float32 dtype for the rest of the process
    assert np.dtype("f4").byteorder == "="


def test_old_ordered_dict_state_dicts_load():
    weights = OrderedDict([("a", np.ones((2, 2), dtype="f4")), ("b", np.zeros(3, dtype="f8"))])
    state = read_state_dict(pickle.dumps(weights, protocol=2))
    assert list(state) == ["a", "b"]


def test_split_big_arrays_are_joined():
    whole = np.arange(12, dtype="f4").reshape(3, 4)
    raw = {
        "w@@.0": whole.ravel()[:5],
        "w@@.1": whole.ravel()[5:],
        "UnpackBigParamInfor@@": {"w": {"OriginShape": [3, 4], "slices": ["w@@.0", "w@@.1"]}},
    }
    np.testing.assert_array_equal(read_state_dict(pickle.dumps(raw, protocol=2))["w"], whole)
    raw["UnpackBigParamInfor@@"]["w"]["slices"].append("missing")
    with pytest.raises(WeightsError, match="split array"):
        read_state_dict(pickle.dumps(raw, protocol=2))


# --- files that are not weights at all --------------------------------------------------------------------------

def _valid_bytes() -> bytes:
    return pickle.dumps({"w": np.ones((2, 3), dtype="f4")}, protocol=4)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"<!DOCTYPE html><html><body>Not found</body></html>", r"not a pickled state dict \(.pdparams\): its first"),
        (b'{"error": "AccessDenied", "message": "signature expired"}', "not a pickled state dict"),
        (bytes(range(256)) * 40, "not a pickled state dict"),
        (b"\x80\x04\xff" + bytes(64), "is damaged: it begins as a pickled state dict"),
        (_valid_bytes()[:-7], "is truncated"),
        (_valid_bytes() + b"\x00" * 16, "extra bytes"),
        (_valid_bytes() + _valid_bytes(), "extra bytes"),
        (b"", "is empty"),
        (pickle.dumps([np.ones(2)], protocol=4), "not a dict"),
        (pickle.dumps({"w": [1.0, 2.0]}, protocol=4), "not an array"),
        (pickle.dumps({}, protocol=4), "no parameters"),
    ],
    ids=["html", "error-json", "random", "unknown-opcode", "truncated", "padded", "two-pickles", "empty", "list", "not-array", "empty-dict"],
)
def test_non_weights_are_rejected(payload, reason):
    with pytest.raises(WeightsError, match=reason) as caught:
        read_state_dict(payload)
    assert "\n" not in str(caught.value)


def test_padding_inside_the_last_frame_is_rejected():
    data = _valid_bytes()
    assert data[2:3] == pickle.FRAME
    (length,) = struct.unpack("<Q", data[3:11])
    assert 11 + length == len(data), "a small pickle is one frame"
    pad = b"\x00" * 8
    padded = data[:3] + struct.pack("<Q", length + len(pad)) + data[11:] + pad
    with pytest.raises(WeightsError, match="extra bytes"):
        read_state_dict(padded)


# --- hostile files ----------------------------------------------------------------------------------------------

class _Call:
    """Pickles as ``func(*args)``: the shape of every code-execution payload."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __call__(self, *args: Any) -> Any:  # pickle insists the reduce target is callable
        raise AssertionError("never called while pickling")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


class _Built:
    """Pickles as ``func(*args)`` followed by BUILD with ``state``."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args, self.state


def _touch_command(marker: Path) -> str:
    return f"touch {marker}"


def _hostile_payloads(marker: Path) -> dict[str, tuple[bytes, bool]]:
    """name -> (pickle bytes, whether plain ``pickle.loads`` of it creates ``marker``: the proof it is real)."""
    touch = _touch_command(marker)
    code = f"open({str(marker)!r}, 'w').close()"
    weights = {"w": np.ones(2, dtype="f4")}
    payloads: dict[str, tuple[bytes, bool]] = {
        "os.system": (pickle.dumps(_Call(os.system, touch), protocol=2), True),
        "os.system-protocol4": (pickle.dumps(_Call(os.system, touch), protocol=4), True),
        "subprocess.Popen": (pickle.dumps(_Call(subprocess.Popen, ["touch", str(marker)]), protocol=3), True),
        "builtins.eval": (pickle.dumps(_Call(builtins.eval, code), protocol=2), True),
        "builtins.exec": (pickle.dumps(_Call(builtins.exec, code), protocol=4), True),
        "getattr-import": (
            pickle.dumps(_Call(_Call(builtins.getattr, _Call(builtins.__import__, "os"), "system"), touch), protocol=2),
            True,
        ),
        "inside-a-state-dict": (pickle.dumps({**weights, "evil": _Call(os.system, touch)}, protocol=4), True),
        # protocol 0's opcodes after a protocol 2 header (a bare protocol 0 pickle is refused before unpickling,
        # below): GLOBAL + INST, an opcode that calls what it names
        "inst-opcode": (f"\x80\x02(S'{touch}'\nios\nsystem\n.".encode("latin1"), True),
        # protocol 0 text form of the same REDUCE
        "text-reduce": (f"\x80\x02cos\nsystem\n(S'{touch}'\ntR.".encode("latin1"), True),
        # dotted names resolve attributes of allowed modules in protocol 4
        "dotted-name": (_stack_global("numpy", "ndarray.__reduce__"), False),
        "dotted-name-globals": (_stack_global("numpy.core.multiarray", "_reconstruct.__globals__"), False),
        "numpy-runstring": (
            pickle.dumps(_Call(np.testing._private.utils.runstring, code, {}), protocol=2), True
        ),
        "numpy-load": (pickle.dumps(_Call(np.load, str(marker)), protocol=2), False),
        "object-array": (pickle.dumps(np.array([_Call(os.system, touch)], dtype=object), protocol=2), True),
        "object-array-in-state-dict": (
            pickle.dumps({"w": np.array([_Call(os.system, touch), 1], dtype=object)}, protocol=4), True
        ),
        # a numeric dtype whose state sets the "holds objects" flags: numpy would read pointers from raw bytes
        "dtype-flags": (pickle.dumps({"w": _Built(np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 63))}, protocol=2), False),
        "dtype-fields": (
            pickle.dumps(_Built(np.dtype, ("f8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 63)), protocol=2),
            False,
        ),
        "array-state-list": (
            pickle.dumps({"w": _Built(np.core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                                      (1, (1,), np.dtype("f8"), False, [_Call(os.system, touch)]))}, protocol=2),
            True,
        ),
        "array-state-floats": (
            pickle.dumps({"w": _Built(np.core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                                      (1, (1,), np.dtype("f8"), False, [1.0]))}, protocol=2),
            False,
        ),
        "reconstruct-other-class": (
            pickle.dumps(_Call(np.core.multiarray._reconstruct, np.ndarray, (5,), b"O"), protocol=2), False
        ),
        "ordered-dict-build": (pickle.dumps(_Built(OrderedDict, (), {"__class__": 1}), protocol=2), False),
        # NEWOBJ (cls.__new__(cls)) naming an allowed class
        "newobj": (b"\x80\x02ccollections\nOrderedDict\n)\x81.", False),
        "persistent-id": (_persistent_payload(), False),
        "valid-then-hostile": (_valid_bytes() + pickle.dumps(_Call(os.system, touch), protocol=4), False),
    }
    return payloads


def test_a_pickle_without_a_protocol_header_is_refused_before_unpickling(tmp_path):
    """paddle writes protocols 2 to 4, which open with their number: a protocol 0 pickle is not weights, and its
    opcodes never reach the unpickler."""
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(WeightsError, match=r"not a pickled state dict \(.pdparams\): its first bytes are not a pickle's"):
        read_state_dict(payload)
    assert not marker.exists()


def _stack_global(module: str, name: str) -> bytes:
    def short(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()

    return b"\x80\x04" + short(module) + short(name) + b"\x93."


def _persistent_payload() -> bytes:
    buffer = io.BytesIO()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return "evil" if isinstance(obj, str) and obj == "x" else None

    Pickler(buffer, protocol=2).dump({"w": "x"})
    return buffer.getvalue()


_NAMES = list(_hostile_payloads(Path("/nonexistent")).keys())


@pytest.mark.parametrize("name", _NAMES)
def test_hostile_pickles_are_refused_and_nothing_runs(name, tmp_path):
    marker = tmp_path / "pwned"
    payload, runs_under_pickle = _hostile_payloads(marker)[name]
    with pytest.raises(WeightsError) as caught:
        read_state_dict(payload)
    assert not marker.exists(), f"{name}: the payload ran"
    message = str(caught.value)
    assert "\n" not in message
    if name != "valid-then-hostile":
        assert isinstance(caught.value, UnsafeWeightsError), message
        assert message.startswith("refuses"), message
    if runs_under_pickle:
        # The control: plain pickle really runs this payload, so the refusal above is what kept it from running.
        try:
            pickle.loads(payload)
        except Exception:
            pass
        for _ in range(100):  # Popen runs touch in a child: give it a moment
            if marker.exists():
                break
            time.sleep(0.02)
        assert marker.exists(), f"{name}: the control payload did not run under pickle.loads"
