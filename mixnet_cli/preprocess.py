"""Images in, network input out: PaddleClas's MixNet evaluation pipeline, reproduced.

PaddleClas decodes with ``cv2.imdecode(..., IMREAD_COLOR)``, resizes the short side with cv2's bilinear filter,
centre-crops, scales and normalises. We decode with Pillow (more formats, and it reports truncated files where
cv2 silently fills them with grey) and convert every image mode the way cv2's decoder does, so the pixels are the
ones PaddleClas sees. The resize is cv2's own ``INTER_LINEAR``: Pillow's bilinear filter antialiases when it
shrinks and cv2's does not, so only cv2 itself gives PaddleClas's pixels exactly (cv2 comes with paddleclas).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import (
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    ImageUnreadableError,
    NotAnImageError,
    TruncatedImageError,
)
from .manifest import Preprocessing

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]

# Pillow warns from 89 megapixels and refuses (DecompressionBombError) beyond twice that; the same limit here.
MAX_PIXELS = 2 * 89_478_485
# Bigger than any photo a classifier needs; a guard against filling memory from a URL or a mistaken path.
MAX_IMAGE_BYTES = 256 * 1024 * 1024
# EXIF orientations that turn or mirror the image (1 is upright).
_TURNED = frozenset(range(2, 9))


def check_image_file(path: Path, name: str) -> None:
    """Raise the :class:`ImageError` a file that cannot be an image gets before it is opened: missing, a
    directory, empty, over :data:`MAX_IMAGE_BYTES`, unreadable."""
    try:
        if path.is_dir():
            raise NotAnImageError(f"{name}: is a directory; pass image files")
        size = path.stat().st_size
        if size == 0:
            raise NotAnImageError(f"{name}: empty file (0 bytes); pass an image file")
        if size > MAX_IMAGE_BYTES:
            raise ImageTooLargeError(f"{name}: {size} bytes is over the {MAX_IMAGE_BYTES}-byte limit for images")
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageNotFoundError(f"{name}: broken symbolic link; fix or remove the link") from None
        raise ImageNotFoundError(f"{name}: no such file; check the path") from None
    except PermissionError:
        raise ImageUnreadableError(f"{name}: permission denied; check the file's permissions") from None


def read_image_bytes(source: Path | bytes, name: str) -> bytes:
    """The encoded bytes of an image file (checked as :func:`check_image_file` does), or ``source`` itself when
    it is bytes already: what a client sends to ``mixnet serve``."""
    if isinstance(source, bytes):
        return source
    check_image_file(source, name)
    try:
        return source.read_bytes()
    except FileNotFoundError:
        raise ImageNotFoundError(f"{name}: no such file; check the path") from None
    except PermissionError:
        raise ImageUnreadableError(f"{name}: permission denied; check the file's permissions") from None
    except OSError as exc:
        raise ImageUnreadableError(f"{name}: cannot read ({exc}); check the file") from None


def _open(source: str | Path | bytes, name: str) -> Image.Image:
    if isinstance(source, bytes):
        if not source:
            raise NotAnImageError(f"{name}: empty data; pass an image file")
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = Path(source)
        check_image_file(stream, name)
    try:
        with warnings.catch_warnings():
            # Pillow warns from MAX_IMAGE_PIXELS (89 MP) and refuses from twice that; we refuse at the same point
            # and let the images between through without the warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except FileNotFoundError:
        raise ImageNotFoundError(f"{name}: no such file; check the path") from None
    except PermissionError:
        raise ImageUnreadableError(f"{name}: permission denied; check the file's permissions") from None
    except Image.DecompressionBombError:
        raise ImageTooLargeError(
            f"{name}: image is larger than {MAX_PIXELS} pixels (a possible decompression bomb); resize it first"
        ) from None
    except UnidentifiedImageError:
        raise NotAnImageError(f"{name}: not an image file Pillow can read (JPEG, PNG, WebP, BMP, GIF, TIFF...)") from None
    except OSError as exc:
        raise ImageUnreadableError(f"{name}: cannot read ({exc}); check the file") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} pixels is more than {MAX_PIXELS} (a possible decompression bomb); resize it first"
        )
    if width < 1 or height < 1:
        raise NotAnImageError(f"{name}: image has no pixels ({width}x{height})")
    return image


def _cmyk_to_rgb_like_cv2(image: Image.Image) -> np.ndarray:
    # cv2 reads the inverted (Adobe) CMYK samples libjpeg returns and mixes in K with integer arithmetic
    # (icvCvt_CMYK2BGR_8u_C4C3R); Pillow has already inverted them back, so undo that first.
    cmyk = 255 - np.asarray(image, dtype=np.int32)
    c, m, y, k = (cmyk[..., i] for i in range(4))
    rgb = np.stack([k - ((255 - c) * k >> 8), k - ((255 - m) * k >> 8), k - ((255 - y) * k >> 8)], axis=-1)
    return rgb.astype(np.uint8)


def _to_rgb_like_cv2(image: Image.Image) -> np.ndarray:
    """An HxWx3 uint8 RGB array with the pixels ``cv2.imdecode(IMREAD_COLOR)`` would give (then BGR->RGB)."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode == "CMYK":
        return _cmyk_to_rgb_like_cv2(image)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey: cv2 keeps the high byte (libpng's strip_16); Pillow's convert() would clip instead.
        high = (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(high[..., None], 3, axis=-1)
    if mode == "F":
        grey = np.asarray(image).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode in ("L", "1", "LA", "La"):
        grey = np.asarray(image.convert("L"))
        return np.repeat(grey[..., None], 3, axis=-1)
    # RGBA, RGBa, P, PA, YCbCr, LAB, HSV...: cv2 drops alpha without compositing, as convert("RGB") does.
    return np.asarray(image.convert("RGB"))


def decode(source: ImageInput, name: str | None = None) -> np.ndarray:
    """Decode an image (path, encoded bytes, PIL image or HxWx3 RGB uint8 array) to an HxWx3 uint8 RGB array.

    EXIF orientation is applied; alpha is dropped; grey, palette, CMYK and 16-bit images become 8-bit RGB, all
    as PaddleClas's cv2 decoder does. GIFs and other multi-frame files give their first frame.
    """
    label = name if name is not None else (str(source) if isinstance(source, (str, Path)) else "<image>")
    if isinstance(source, np.ndarray):
        return _from_array(source, label)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, Path, bytes)):
        image = _open(source, label)
    else:
        raise NotAnImageError(
            f"{label}: a {type(source).__name__} is not an image; pass a path, encoded bytes, a PIL image or an array"
        )
    try:
        image.load()
        if image.getexif().get(ExifTags.Base.Orientation, 1) in _TURNED:
            # Only then: for an upright image exif_transpose returns a copy, a tenth of the decode time.
            image = ImageOps.exif_transpose(image) or image
        return np.ascontiguousarray(_to_rgb_like_cv2(image))
    except ImageError:
        raise
    except OSError as exc:
        text = str(exc)
        if "truncated" in text or "broken data stream" in text or "premature" in text.lower():
            raise TruncatedImageError(f"{label}: image file is truncated or corrupt; re-download or re-export it") from None
        raise NotAnImageError(f"{label}: cannot decode ({text}); check the file") from None
    except (ValueError, SyntaxError, MemoryError) as exc:
        raise NotAnImageError(f"{label}: cannot decode ({exc}); check the file") from None


def _from_array(array: np.ndarray, label: str) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise NotAnImageError(
            f"{label}: arrays must be uint8 HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA), got {array.shape} {array.dtype}"
        )
    return np.ascontiguousarray(array[..., :3])


def transform(rgb: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """PaddleClas's ResizeImage(resize_short) + CropImage + NormalizeImage + ToCHW on an RGB uint8 array."""
    import cv2

    height, width = rgb.shape[:2]
    percent = float(pre.resize_short) / min(width, height)
    new_w, new_h = int(round(width * percent)), int(round(height * percent))
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top = (new_h - pre.crop_size) // 2
    left = (new_w - pre.crop_size) // 2
    crop = resized[top:top + pre.crop_size, left:left + pre.crop_size, :]
    # PaddleClas's (x * scale - mean) / std in float32, the same operations in the same order, so the same bits;
    # done after the move to CHW, where each channel is one contiguous run, which is twice as fast in numpy as
    # broadcasting over a last axis of 3.
    normalised = np.ascontiguousarray(crop.transpose(2, 0, 1)).astype(np.float32)
    normalised *= np.float32(pre.scale)
    normalised -= np.array(pre.mean, dtype=np.float32).reshape(3, 1, 1)
    normalised /= np.array(pre.std, dtype=np.float32).reshape(3, 1, 1)
    return normalised


def load_and_transform(source: ImageInput, pre: Preprocessing, name: str | None = None) -> np.ndarray:
    """decode() then transform(): one image to a 3xSxS float32 array."""
    return transform(decode(source, name), pre)
