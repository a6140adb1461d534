"""Images in, network input out: PaddleClas's MixNet evaluation pipeline, reproduced.

PaddleClas decodes with ``cv2.imdecode(data, IMREAD_COLOR)`` and turns BGR into RGB, resizes the short side with
cv2's bilinear filter, centre-crops, scales and normalises. mixnet decodes with that same call, so every file the
installed OpenCV reads gives PaddleClas's pixels by construction, whatever its format, bit depth, colour model or
EXIF orientation. Pillow serves for the rest:

- reading the header first, so that a file whose header claims more than :data:`MAX_PIXELS` is refused before any
  decoder allocates it;
- telling a truncated JPEG from a whole one (OpenCV 4.6 fills the missing part with grey without a word);
- decoding what OpenCV cannot (GIF, AVIF and animated WebP with OpenCV 4.6; ICO, TGA, PSD, QOI...), converting
  its pixels the way OpenCV's decoders would where the format has an OpenCV counterpart.

The resize is cv2's own ``INTER_LINEAR``: Pillow's bilinear filter antialiases when it shrinks and cv2's does not,
so only cv2 itself gives PaddleClas's pixels exactly.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ..base.errors import (
    ImageError,
    ImageTooLargeError,
    LibraryError,
    NotAnImageError,
    TruncatedImageError,
)
from ..base.manifest import Preprocessing
from ..base.third_party import native_stderr_silenced
# Re-exported: what was checked before decoding is read from one place (the module imports no decoder, for
# `classify --server`, which sends the files as they are).
from .encoded import IMAGE_SUFFIXES, MAX_IMAGE_BYTES, read_image_bytes  # noqa: F401

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]

# Pillow warns from 89 megapixels and refuses (DecompressionBombError) beyond twice that; the same limit here, for
# the decoded image and for the resized one (an extreme strip, 1,000,000 x 1, would become 256,000,000 x 256).
MAX_PIXELS = 2 * 89_478_485
# EXIF orientations that turn or mirror the image (1 is upright).
_TURNED = frozenset(range(2, 9))

def _cv2() -> Any:
    from ..base.third_party import import_cv2

    return import_cv2(MAX_PIXELS)


def require_opencv() -> None:
    """Load OpenCV now. Raises :class:`~mixnet_cli.base.errors.LibraryError` naming the missing system library
    and the fix when it is installed but cannot load (``opencv-python`` without ``libGL.so.1``)."""
    _cv2()


def _too_large(name: str, width: int, height: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{name}: {width}x{height} pixels is more than {MAX_PIXELS} (a possible decompression bomb); resize it first"
    )


def _open_header(data: bytes, name: str) -> Image.Image | None:
    """Pillow's view of the file, header only (nothing decoded yet); None when Pillow does not know the format.
    Raises :class:`ImageTooLargeError` when the header claims more than :data:`MAX_PIXELS` pixels."""
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 MP and refuses from twice that; we refuse at the same point, silently below it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageTooLargeError(
            f"{name}: image is larger than {MAX_PIXELS} pixels (a possible decompression bomb); resize it first"
        ) from None
    except Exception:  # unknown, or a header Pillow rejects (a bad CRC on an optional PNG chunk): OpenCV may read it
        return None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise _too_large(name, width, height)
    return image


def header_pixels(data: bytes, *, other_formats: bool = False) -> int | None:
    """Width x height that an image's header claims, for budgeting memory before a decode (the decoder checks
    the limit again). PNG and JPEG are read without a decoder in microseconds (a JPEG's segments are skipped by
    their lengths, fill bytes at C speed); other formats only with ``other_formats``, by Pillow's header reader
    (milliseconds: run it off the event loop). None for a header that does not parse."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")
    if data[:2] == b"\xff\xd8":
        size = jpeg_size(data)
        return None if size is None else size[0] * size[1]
    if not other_formats:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            width, height = Image.open(io.BytesIO(data)).size
    except Exception:  # noqa: BLE001 (not a format Pillow knows: the decoder says what it is)
        return None
    return width * height


# Start-of-frame markers (baseline, progressive, lossless, arithmetic...), which carry the image's size; C4, C8
# and CC are other segments that share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's first frame header, found by walking its segments (so an EXIF thumbnail's
    header inside APP1 is skipped); None when ``data`` is not a JPEG or ends before a frame header."""
    if data[:2] != b"\xff\xd8":
        return None
    position, end = 2, len(data)
    while position < end:
        if data[position] != 0xFF:
            return None
        # Any number of FF fill bytes may precede a marker: skipped in one C call, not byte by byte.
        window = data[position:position + 65536]
        fill = len(window) - len(window.lstrip(b"\xff"))
        if fill == 65536:
            return None  # a run of fill bytes no encoder writes: not worth reading further
        marker_at = position + fill
        if marker_at >= end:
            return None
        marker = data[marker_at]
        if marker in (0xD9, 0xDA):  # end of image, or a scan before any frame header
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            position = marker_at + 1
            continue
        if marker_at + 3 > end:
            return None
        length = int.from_bytes(data[marker_at + 1:marker_at + 3], "big")
        if marker in _JPEG_SOF:
            if length < 7 or marker_at + 8 > end:
                return None
            height = int.from_bytes(data[marker_at + 4:marker_at + 6], "big")
            width = int.from_bytes(data[marker_at + 6:marker_at + 8], "big")
            return width, height
        position = marker_at + 1 + length
    return None


def _check_jpeg_complete(data: bytes, header: Image.Image, name: str) -> None:
    # OpenCV 4.6's libjpeg fills the missing end of a truncated JPEG with grey and returns an image. A whole file
    # ends with the end-of-image marker (FF D9 cannot occur inside the compressed data, where FF is escaped), and
    # a cut-short one cannot, so that is the common case settled for free. Others (a cut file, or one with bytes
    # after its end marker) go to Pillow's decoder, which says "truncated"; at 1/8 scale, the DCT's own
    # downscaling, it still reads every byte of the compressed data.
    if data.rstrip(b"\x00")[-2:] == b"\xff\xd9":
        return
    width, height = header.size
    try:
        header.draft(None, (max(1, width // 8), max(1, height // 8)))
        header.load()
    except OSError as exc:
        if "truncated" in str(exc):
            raise TruncatedImageError(f"{name}: image file is truncated; re-download or re-export it") from None
    except Exception:  # noqa: BLE001 - any other complaint of Pillow's: OpenCV read the file, as PaddleClas does
        pass


def _decode_bytes(data: bytes, name: str) -> np.ndarray:
    if data[:3] == b"\xff\xd8\xff":
        return _decode_jpeg(data, name)
    header = _open_header(data, name)
    cv2 = _cv2()
    try:
        with native_stderr_silenced():  # libpng's and libjpeg's own warnings: this input's error says it
            bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None  # a size over OpenCV's own limit, or a decoder's assertion: Pillow has its say below
    if bgr is not None and bgr.size:
        if header is not None and header.format in ("JPEG", "MPO"):
            _check_jpeg_complete(data, header, name)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if header is None:
        raise NotAnImageError(
            f"{name}: not an image file OpenCV or Pillow can read (JPEG, PNG, WebP, BMP, GIF, TIFF...)")
    if header.format in _OPENCV_COMPLETE_FORMATS:
        # libjpeg and libpng read every valid file of these formats: one they refuse is damaged (Pillow would fill
        # a PNG's missing rows with black and say nothing), and PaddleClas could not read it either.
        raise TruncatedImageError(f"{name}: {header.format} file is truncated or damaged (OpenCV cannot decode it); "
                                  "re-download or re-export it")
    return _pillow_pixels(header, name)


def _decode_jpeg(data: bytes, name: str) -> np.ndarray:
    # OpenCV first, with the pixel limit read from the frame header by jpeg_size: Pillow's header reader scans
    # for markers byte by byte, seconds for a file of millions of fill bytes that libjpeg refuses at once.
    size = jpeg_size(data)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise _too_large(name, *size)
    cv2 = _cv2()
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    if bgr is None or not bgr.size:
        if size is None:
            raise NotAnImageError(
                f"{name}: not an image file OpenCV or Pillow can read (JPEG, PNG, WebP, BMP, GIF, TIFF...)")
        raise TruncatedImageError(f"{name}: JPEG file is truncated or damaged (OpenCV cannot decode it); "
                                  "re-download or re-export it")
    if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        header = _open_header(data, name)  # only for a file without its end marker: Pillow says if it is cut
        if header is not None:
            _check_jpeg_complete(data, header, name)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# Formats whose every valid file OpenCV decodes, in every version mixnet supports.
_OPENCV_COMPLETE_FORMATS = frozenset({"JPEG", "MPO", "PNG"})


def _cmyk_to_rgb_like_cv2(image: Image.Image) -> np.ndarray:
    # cv2 reads the inverted (Adobe) CMYK samples libjpeg returns and mixes in K with integer arithmetic
    # (icvCvt_CMYK2BGR_8u_C4C3R); Pillow has already inverted them back, so undo that first.
    cmyk = 255 - np.asarray(image, dtype=np.int32)
    c, m, y, k = (cmyk[..., i] for i in range(4))
    rgb = np.stack([k - ((255 - c) * k >> 8), k - ((255 - m) * k >> 8), k - ((255 - y) * k >> 8)], axis=-1)
    return rgb.astype(np.uint8)


def _to_rgb_like_cv2(image: Image.Image) -> np.ndarray:
    """An HxWx3 uint8 RGB array from a Pillow image, converted as OpenCV's decoders convert the same pixel
    format: for images handed in as PIL images, and files only Pillow reads."""
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


def _pillow_pixels(image: Image.Image, name: str) -> np.ndarray:
    """Decode a Pillow image (its first frame), apply its EXIF orientation, and convert it to RGB."""
    try:
        image.load()
        if image.getexif().get(ExifTags.Base.Orientation, 1) in _TURNED:
            # Only then: for an upright image exif_transpose returns a copy, a tenth of the decode time.
            image = ImageOps.exif_transpose(image) or image
        return np.ascontiguousarray(_to_rgb_like_cv2(image))
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        text = str(exc).lower()
        if any(sign in text for sign in _TRUNCATION_SIGNS) or isinstance(exc, EOFError):
            raise TruncatedImageError(f"{name}: image file is truncated or corrupt; re-download or re-export it") from None
        kind = f"{image.format} file" if image.format else "image"
        raise TruncatedImageError(f"{name}: {kind} is damaged or truncated ({_first_line(exc)}); re-download or "
                                  "re-export it") from None


# How Pillow's decoders say that the data ended early.
_TRUNCATION_SIGNS = ("truncated", "broken data stream", "premature", "not enough", "unexpected end", "incomplete")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def decode(source: ImageInput, name: str | None = None) -> np.ndarray:
    """Decode an image (path, encoded bytes, PIL image or HxWx3 RGB uint8 array) to an HxWx3 uint8 RGB array.

    Files and bytes are decoded by ``cv2.imdecode(IMREAD_COLOR)``, exactly as PaddleClas does (EXIF orientation
    applied, alpha dropped, grey, palette, CMYK and 16-bit images made 8-bit BGR by OpenCV's rules), then made
    RGB; what the installed OpenCV cannot read is decoded by Pillow (the first frame of an animation). Raises an
    :class:`~mixnet_cli.base.errors.ImageError` subclass for anything wrong with this input, whatever the library
    underneath raised: missing, unreadable, empty, truncated, not an image, over :data:`MAX_PIXELS`.
    """
    label = name if name is not None else (str(source) if isinstance(source, (str, Path)) else "<image>")
    try:
        if isinstance(source, np.ndarray):
            return _from_array(source, label)
        if isinstance(source, Image.Image):
            width, height = source.size
            if width * height > MAX_PIXELS:
                raise _too_large(label, width, height)
            return _pillow_pixels(source, label)
        if isinstance(source, (str, Path, bytes)):
            return _decode_bytes(read_image_bytes(source, label), label)
        raise NotAnImageError(
            f"{label}: a {type(source).__name__} is not an image; pass a path, encoded bytes, a PIL image or an array"
        )
    except (ImageError, LibraryError):  # LibraryError: OpenCV cannot load, which is no image's fault
        raise
    except MemoryError:
        raise ImageTooLargeError(f"{label}: not enough memory to decode this image; resize it first") from None
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises for one input is that input's error
        raise NotAnImageError(f"{label}: cannot decode ({type(exc).__name__}: {_first_line(exc)}); check the file") from None


def _from_array(array: np.ndarray, label: str) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise NotAnImageError(
            f"{label}: arrays must be uint8 HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA), got {array.shape} {array.dtype}"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise NotAnImageError(f"{label}: image has no pixels ({array.shape[1]}x{array.shape[0]})")
    return np.ascontiguousarray(array[..., :3])


def resized_size(width: int, height: int, pre: Preprocessing) -> tuple[int, int]:
    """PaddleClas's ResizeImage(resize_short): the short side to ``pre.resize_short``, the long one in proportion."""
    percent = float(pre.resize_short) / min(width, height)
    return int(round(width * percent)), int(round(height * percent))


def crop_offsets(resized_width: int, resized_height: int, pre: Preprocessing) -> tuple[int, int]:
    """PaddleClas's CropImage: the centre crop's ``(left, top)`` in the resized image, in pixels."""
    return (resized_width - pre.crop_size) // 2, (resized_height - pre.crop_size) // 2


def crop_region(width: int, height: int, pre: Preprocessing) -> tuple[float, float, float, float]:
    """The part of a ``width x height`` photo that the network sees, as ``(left, top, right, bottom)`` in the
    photo's pixel coordinates (pixel edges; floats): the crop of :func:`transform` taken back through its resize.
    cv2's resize maps pixel edges proportionally (pixel centres at ``(x + 0.5) * scale - 0.5``), so edge ``e`` of
    the resized image is edge ``e * width / resized_width`` of the photo."""
    new_w, new_h = resized_size(width, height, pre)
    left, top = crop_offsets(new_w, new_h, pre)
    scale_x, scale_y = width / new_w, height / new_h
    return (left * scale_x, top * scale_y, (left + pre.crop_size) * scale_x, (top + pre.crop_size) * scale_y)


def transform(rgb: np.ndarray, pre: Preprocessing, name: str = "<image>") -> np.ndarray:
    """PaddleClas's ResizeImage(resize_short) + CropImage + NormalizeImage + ToCHW on an HxWx3 RGB uint8 array:
    a 3xSxS float32 array (S = ``pre.crop_size``). Raises :class:`ImageTooLargeError` when the resized image
    would be over :data:`MAX_PIXELS` (an extreme aspect ratio)."""
    cv2 = _cv2()
    height, width = rgb.shape[:2]
    new_w, new_h = resized_size(width, height, pre)
    if new_w * new_h > MAX_PIXELS:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} is too elongated: resizing its short side to {pre.resize_short} would make "
            f"{new_w}x{new_h} pixels; crop it to a less extreme aspect ratio first"
        )
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    left, top = crop_offsets(new_w, new_h, pre)
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
    """decode() then transform(): one image to a 3xSxS float32 array. Whatever goes wrong with this input is
    raised as an :class:`~mixnet_cli.base.errors.ImageError` naming it."""
    return load_photo_and_transform(source, pre, name)[1]


def load_photo_and_transform(source: ImageInput, pre: Preprocessing,
                             name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`load_and_transform`, also returning the decoded photo (``H x W x 3`` uint8 RGB) that the
    network input was made from: ``(photo, input)``."""
    label = name if name is not None else (str(source) if isinstance(source, (str, Path)) else "<image>")
    rgb = decode(source, label)
    try:
        return rgb, transform(rgb, pre, label)
    except (ImageError, LibraryError):
        raise
    except MemoryError:
        raise ImageTooLargeError(f"{label}: not enough memory to resize this image; resize it first") from None
    except Exception as exc:  # noqa: BLE001 - OpenCV's errors for one odd image end that image, not the run
        raise NotAnImageError(f"{label}: cannot resize ({type(exc).__name__}: {_first_line(exc)}); check the file") from None
