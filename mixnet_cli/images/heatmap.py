"""Class activation maps drawn over the photo: the 7 x 7 map placed on the part of the photo the network saw.

The network sees a centre crop of the photo resized (:func:`~mixnet_cli.images.preprocess.crop_region`), so the map
goes there, through the same resize and crop taken backwards: cell ``j`` of the map holds the value at the centre
of its receptive field, pixel ``32 j`` of the crop (why: the comment above ``_axis``). Between centres it is
interpolated with a cubic kernel (smooth, no blocks; held constant past the outer centres), evaluated at each photo
pixel's own centre, so the geometry holds at any photo size and aspect ratio. The picture is the photo with the map
over the crop in a perceptually uniform colour map (inferno: equal steps in value look like equal steps in colour,
and it reads in grey), normalised per image, no legend; the photo outside the crop is dimmed, since the network
never saw it.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from ..base.manifest import Preprocessing
from .preprocess import crop_offsets, resized_size

# matplotlib's "inferno" (Smith and van der Walt, public domain, CC0), 256 RGB colours from dark to bright, copied
# here so that drawing needs no plotting library.
_INFERNO_HEX = (
    "00000401000501010601010802010a02020c02020e03021004031204031405041706041907051b08051d09061f0a0722"
    "0b07240c08260d08290e092b10092d110a30120a32140b34150b37160b39180c3c190c3e1b0c411c0c431e0c451f0c48"
    "210c4a230c4c240c4f260c51280b53290b552b0b572d0b592f0a5b310a5c320a5e340a5f3609613809623909633b0964"
    "3d09653e0966400a67420a68440a68450a69470b6a490b6a4a0c6b4c0c6b4d0d6c4f0d6c510e6c520e6d540f6d550f6d"
    "57106e59106e5a116e5c126e5d126e5f136e61136e62146e64156e65156e67166e69166e6a176e6c186e6d186e6f196e"
    "71196e721a6e741a6e751b6e771c6d781c6d7a1d6d7c1d6d7d1e6d7f1e6c801f6c82206c84206b85216b87216b88226a"
    "8a226a8c23698d23698f24699025689225689326679526679727669827669a28659b29649d29649f2a63a02a63a22b62"
    "a32c61a52c60a62d60a82e5fa92e5eab2f5ead305dae305cb0315bb1325ab3325ab43359b63458b73557b93556ba3655"
    "bc3754bd3853bf3952c03a51c13a50c33b4fc43c4ec63d4dc73e4cc83f4bca404acb4149cc4248ce4347cf4446d04545"
    "d24644d34743d44842d54a41d74b3fd84c3ed94d3dda4e3cdb503bdd513ade5238df5337e05536e15635e25734e35933"
    "e45a31e55c30e65d2fe75e2ee8602de9612bea632aeb6429eb6628ec6726ed6925ee6a24ef6c23ef6e21f06f20f1711f"
    "f1731df2741cf3761bf37819f47918f57b17f57d15f67e14f68013f78212f78410f8850ff8870ef8890cf98b0bf98c0a"
    "f98e09fa9008fa9207fa9407fb9606fb9706fb9906fb9b06fb9d07fc9f07fca108fca309fca50afca60cfca80dfcaa0f"
    "fcac11fcae12fcb014fcb216fcb418fbb61afbb81dfbba1ffbbc21fbbe23fac026fac228fac42afac62df9c72ff9c932"
    "f9cb35f8cd37f8cf3af7d13df7d340f6d543f6d746f5d949f5db4cf4dd4ff4df53f4e156f3e35af3e55df2e661f2e865"
    "f2ea69f1ec6df1ed71f1ef75f1f179f2f27df2f482f3f586f3f68af4f88ef5f992f6fa96f8fb9af9fc9dfafda1fcffa4"
)
INFERNO = np.frombuffer(bytes.fromhex(_INFERNO_HEX), dtype=np.uint8).reshape(256, 3)

# How bright the photo stays outside the crop, and how strongly the colour covers it inside: from MIN_ALPHA where
# the map is lowest to MIN_ALPHA + ALPHA_RANGE where it is highest, so the photo still shows through the hot parts.
DIM_OUTSIDE = 0.35
MIN_ALPHA = 0.35
ALPHA_RANGE = 0.4
# A 7 x 7 map has no detail for more pixels than this along the long side; larger photos are drawn shrunk to it
# (a 24-megapixel photo would otherwise make a 50 MB PNG).
MAX_OVERLAY_SIDE = 1600


# Where each cell of the map sits on the crop: at its receptive field's centre. Every stride-2 layer of MixNet pads
# symmetrically ((k - 1) / 2), so its output j is centred on its input 2j; after the five of them, cell j of the
# 7 x 7 map is centred on pixel 32j of the crop, not on 32j + 15.5 (the middle of the j-th block of 32 pixels, where
# a plain resize of the map would put it). Placed by the blocks' middles, the maximum of a map lands half a cell to
# the right of and below the object that made it (tests/test_cam.py finds it inside a square only this way).


def _cubic(distance: np.ndarray) -> np.ndarray:
    """Keys's cubic convolution kernel (a = -0.5, Catmull-Rom): interpolates, continuous slope."""
    x = np.abs(distance)
    a = -0.5
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _axis(length: int, out_length: int, resized: int, offset: int, pre: Preprocessing,
          cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis of an ``out_length``-pixel drawing of a ``length``-pixel photo: the interpolation weights
    (``out_length x cells``) of each pixel on the map's cells, and which pixels fall inside the crop."""
    photo = (np.arange(out_length) + 0.5) * (length / out_length) - 0.5  # pixel centres, in photo pixels
    in_resized = (photo + 0.5) * (resized / length) - 0.5  # cv2's resize: centres map proportionally
    in_crop = in_resized - offset
    inside = (in_crop >= -0.5) & (in_crop < pre.crop_size - 0.5)
    # Cell j centred on crop pixel 32j (above); held at the outer cells' values past their centres (a cubic would
    # carry the slope on and overshoot there).
    cell = np.clip(in_crop * (cells / pre.crop_size), 0, cells - 1)
    base = np.floor(cell).astype(np.int64)
    weights = np.zeros((out_length, cells))
    rows = np.arange(out_length)
    for step in (-1, 0, 1, 2):
        np.add.at(weights, (rows, np.clip(base + step, 0, cells - 1)), _cubic(cell - (base + step)))
    return weights, inside


def map_at_photo_size(cam: np.ndarray, width: int, height: int, pre: Preprocessing,
                      size: tuple[int, int] | None = None) -> np.ndarray:
    """The ``k x k`` map ``cam`` over a ``width x height`` photo: float32 ``height x width`` (or ``size`` =
    ``(w, h)``, a drawing of the photo at another scale), the map smoothly interpolated on the crop the network
    saw and NaN outside it, where the network saw nothing. Raises ``ValueError`` for a map that is not square."""
    grid = np.asarray(cam, dtype=np.float64)
    if grid.ndim != 2 or grid.shape[0] != grid.shape[1]:
        raise ValueError(f"a class activation map is a square grid, got shape {grid.shape}")
    out_w, out_h = size or (width, height)
    new_w, new_h = resized_size(width, height, pre)
    left, top = crop_offsets(new_w, new_h, pre)
    across, inside_x = _axis(width, out_w, new_w, left, pre, grid.shape[1])
    down, inside_y = _axis(height, out_h, new_h, top, pre, grid.shape[0])
    placed = (down @ grid @ across.T).astype(np.float32)
    placed[~inside_y, :] = np.nan
    placed[:, ~inside_x] = np.nan
    return placed


def overlay(photo: np.ndarray, cam: np.ndarray, pre: Preprocessing,
            max_side: int = MAX_OVERLAY_SIDE) -> np.ndarray:
    """The picture of a class activation map: ``photo`` (``H x W x 3`` uint8 RGB, as decoded for the network)
    with ``cam`` over the crop the network saw, normalised to this map's own range and coloured with
    :data:`INFERNO`; outside the crop the photo dimmed. Returns ``H x W x 3`` uint8 RGB, shrunk to ``max_side``
    pixels on its long side when the photo is larger."""
    import cv2

    height, width = photo.shape[:2]
    scale = min(1.0, max_side / max(width, height))
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    canvas = photo if scale == 1.0 else cv2.resize(photo, (out_w, out_h), interpolation=cv2.INTER_AREA)
    placed = map_at_photo_size(cam, width, height, pre, (out_w, out_h))
    inside = ~np.isnan(placed)
    values = placed[inside]
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    level = np.zeros_like(placed)
    if high > low:
        level[inside] = (values - low) / (high - low)
    alpha = (MIN_ALPHA + ALPHA_RANGE * level)[..., None]
    colours = INFERNO[np.rint(level * 255).astype(np.uint8)].astype(np.float32)
    drawn = np.where(inside[..., None], canvas * (1 - alpha) + colours * alpha, canvas * DIM_OUTSIDE)
    return np.clip(np.rint(drawn), 0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An ``H x W x 3`` uint8 RGB picture as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


OVERLAY_SUFFIX = ".cam.png"


def _stem(input_name: str) -> str:
    """The stem a picture of ``input_name`` is named after: a file's name without its extension, a URL's last
    path segment (characters other than letters, digits, ``.``, ``_``, ``-`` made ``_``), ``stdin`` for ``-``."""
    from urllib.parse import urlsplit

    if input_name == "-":
        return "stdin"
    if "://" in input_name:
        segment = urlsplit(input_name).path.rstrip("/").rsplit("/", 1)[-1]
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", PurePosixPath(segment).stem).strip("._")
        return stem or "image"
    return Path(input_name).stem or "image"


def overlay_paths(input_names: Sequence[str], directory: Path) -> list[Path]:
    """Where the pictures of these inputs go, one path per name in order: ``directory/<stem>.cam.png``, the stem
    from the input's name; a stem met before (case aside) gets ``-2``, ``-3``... in input order, and a path that
    is one of the inputs themselves gets the next number, so no input is ever overwritten."""
    inputs = set()
    for name in input_names:
        if name != "-" and "://" not in name:
            inputs.add(os.path.normcase(str(Path(name).expanduser().resolve())))
    taken: set[str] = set()
    paths = []
    for name in input_names:
        stem = _stem(name)
        number = 1
        while True:
            candidate = directory / f"{stem if number == 1 else f'{stem}-{number}'}{OVERLAY_SUFFIX}"
            key = os.path.normcase(str(candidate.expanduser().resolve())).casefold()
            if key not in taken and os.path.normcase(str(candidate.expanduser().resolve())) not in inputs:
                break
            number += 1
        taken.add(key)
        paths.append(candidate)
    return paths
