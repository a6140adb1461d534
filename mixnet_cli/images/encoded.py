"""Encoded image files before any decoder: the file name extensions read, the size limit, and reading a file
whole with the checks that need no decoder. Imports neither numpy nor an image library, so that ``classify
--server`` (which sends the files as they are) starts without them."""

from __future__ import annotations

import stat
from pathlib import Path

from ..base.errors import ImageNotFoundError, ImageTooLargeError, ImageUnreadableError, NotAnImageError

# Bigger than any photo a classifier needs; a guard against filling memory from a URL or a mistaken path.
MAX_IMAGE_BYTES = 256 * 1024 * 1024
# The file name extensions of every format the decoder reads, lower case: what a directory listing picks up.
# OpenCV's (imgcodecs: JPEG, PNG, BMP, WebP, AVIF, TIFF, the PNM family, PFM, Sun raster, JPEG 2000, GIF) and
# Pillow's still images (MPO, APNG, ICO, TGA, PSD, QOI, SGI, PCX, DDS, XBM, XPM...). Pillow formats that are not
# pictures (.h5, .grib, .mpg: stubs it can only identify) or need outside tools (.eps, .wmf) are left out.
# tests/test_decode.py writes a file for each extension it can and checks that it is listed and read.
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo",
    ".png", ".apng",
    ".bmp", ".dib",
    ".gif",
    ".webp",
    ".avif", ".avifs",
    ".tif", ".tiff",
    ".pbm", ".pgm", ".ppm", ".pnm", ".pxm", ".pfm",
    ".sr", ".ras",
    ".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx",
    ".ico", ".cur", ".icns",
    ".tga", ".psd", ".qoi", ".sgi", ".pcx", ".dds", ".xbm", ".xpm",
})


def read_image_bytes(source: str | Path | bytes, name: str) -> bytes:
    """The encoded file, whole, with the checks that need no decoder (what ``classify --server`` sends).
    Raises the input's :class:`ImageError`: missing, a directory, empty, over :data:`MAX_IMAGE_BYTES`."""
    if isinstance(source, bytes):
        if not source:
            raise NotAnImageError(f"{name}: empty data; pass an image file")
        if len(source) > MAX_IMAGE_BYTES:
            raise ImageTooLargeError(f"{name}: {len(source)} bytes is over the {MAX_IMAGE_BYTES}-byte limit for images")
        return source
    path = Path(source)
    try:
        if path.is_dir():
            raise NotAnImageError(f"{name}: is a directory; pass image files")
        if not stat.S_ISREG(path.stat().st_mode):
            # A FIFO would block the open until a writer comes; a device would be read up to the size limit.
            raise NotAnImageError(f"{name}: not a regular file (a pipe, socket or device); pass image files")
        with path.open("rb") as stream:
            data = stream.read(MAX_IMAGE_BYTES + 1)
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageNotFoundError(f"{name}: broken symbolic link; fix or remove the link") from None
        raise ImageNotFoundError(f"{name}: no such file; check the path") from None
    except PermissionError:
        raise ImageUnreadableError(f"{name}: permission denied; check the file's permissions") from None
    except IsADirectoryError:
        raise NotAnImageError(f"{name}: is a directory; pass image files") from None
    except OSError as exc:
        raise ImageUnreadableError(f"{name}: cannot read ({exc.strerror or exc}); check the file") from None
    if not data:
        raise NotAnImageError(f"{name}: empty file (0 bytes); pass an image file")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageTooLargeError(f"{name}: more than {MAX_IMAGE_BYTES} bytes, over the limit for images")
    return data
