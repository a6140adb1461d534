"""Generated test images: natural-looking content (smooth gradients, shapes, soft colour blobs) in every file
kind and pixel format the classifier has to read the way PaddleClas's cv2 decoder does.

Pure noise would make poor test images: a network sees noise as one texture, so every noise image gets the same
answer. Gradients and shapes give each image its own statistics, and so its own confident answer from the
calibrated test weights.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def scene(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An ``height x width x 3`` uint8 RGB picture: a smooth two-colour gradient, a few soft colour blobs and
    some filled shapes, lightly blurred so edges look photographic rather than aliased."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    along = (xs * np.cos(angle) + ys * np.sin(angle)) / max(width, height)
    along = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    canvas = start + (end - start) * along[..., None]
    for _ in range(rng.integers(2, 5)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.1, 0.5) * max(width, height)
        weight = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * radius**2))[..., None]
        canvas = canvas * (1 - weight) + rng.uniform(0, 255, 3) * weight
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    size = min(width, height)
    for _ in range(rng.integers(2, 7)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * size + 1, y0 + rng.uniform(0.1, 0.6) * size + 1
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 2:
            points = [(float(x), float(y)) for x, y in zip(rng.uniform(x0, x1, 3), rng.uniform(y0, y1, 3))]
            draw.polygon(points, fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=max(1, int(size * rng.uniform(0.01, 0.05))))
    if size >= 16:
        image = image.filter(ImageFilter.GaussianBlur(radius=size / 200))
    return np.asarray(image)


def scenes(count: int, width: int, height: int, seed: int) -> list[np.ndarray]:
    """``count`` different scenes, reproducibly."""
    rng = np.random.default_rng(seed)
    return [scene(rng, width, height) for _ in range(count)]


def _exif_rotated(rgb: Image.Image, orientation: int, path: Path) -> None:
    # Stored pixels are the upright picture turned the opposite way, so a reader that honours the tag sees it
    # upright and one that ignores it sees it rotated or mirrored: the two give different answers.
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    rgb.transpose(undo).save(path, quality=92, exif=exif.tobytes())


def write_test_images(directory: Path, seed: int = 1) -> dict[str, Path]:
    """Write one file of each kind into ``directory``; returns ``{kind: path}``.

    Kinds: RGB/grey/CMYK JPEG, EXIF orientations 3, 6 and 8, grey/palette/palette-with-transparency/RGBA/LA
    PNG, 16-bit grey and 16-bit RGB PNG, a tiny and a very wide image, WebP, BMP, TIFF and GIF.
    """
    import cv2

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths: dict[str, Path] = {}

    def picture(width: int = 320, height: int = 240) -> Image.Image:
        return Image.fromarray(scene(rng, width, height))

    def put(kind: str, filename: str) -> Path:
        paths[kind] = directory / filename
        return paths[kind]

    picture(640, 480).save(put("rgb_jpeg", "rgb.jpg"), quality=90)
    picture().convert("L").save(put("grey_jpeg", "grey.jpg"), quality=90)
    picture().convert("L").save(put("grey_png", "grey.png"))
    picture().convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(put("palette_png", "palette.png"))
    transparent = picture().convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    transparent.info["transparency"] = 0  # palette index 0 see-through: readers must still show its colour
    transparent.save(put("palette_transparent_png", "palette_transparent.png"), transparency=0)
    rgba = picture().convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgba.width, dtype=np.float32), (rgba.height, 1)).astype(np.uint8)
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(put("rgba_png", "rgba.png"))
    la = picture().convert("LA")
    la.putalpha(Image.fromarray(alpha))
    la.save(put("la_png", "la.png"))
    picture().convert("CMYK").save(put("cmyk_jpeg", "cmyk.jpg"), quality=90)

    # 16-bit files: every low byte differs from zero, so a reader that rounds instead of keeping the high byte,
    # or that clips, shows it.
    grey16 = np.asarray(picture().convert("L")).astype(np.uint16) * 256 + rng.integers(0, 256, (240, 320)).astype(np.uint16)
    cv2.imwrite(str(put("grey16_png", "grey16.png")), grey16)
    rgb16 = np.asarray(picture()).astype(np.uint16) * 256 + rng.integers(0, 256, (240, 320, 3)).astype(np.uint16)
    cv2.imwrite(str(put("rgb16_png", "rgb16.png")), rgb16[..., ::-1].copy())

    for orientation in (3, 6, 8):
        # Not square, so a rotation that is ignored also changes the aspect ratio and the crop.
        _exif_rotated(picture(360, 240), orientation, put(f"exif{orientation}_jpeg", f"exif{orientation}.jpg"))

    picture(5, 3).save(put("tiny_png", "tiny.png"))
    picture(2000, 60).save(put("wide_jpeg", "wide.jpg"), quality=90)
    picture().save(put("webp", "image.webp"), quality=90)
    picture().save(put("bmp", "image.bmp"))
    picture().save(put("tiff", "image.tiff"))
    frames = [picture() for _ in range(2)]
    frames[0].save(put("gif", "image.gif"), save_all=True, append_images=frames[1:], duration=100)
    return paths


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height``: enough for Pillow to judge its size before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# --- the decode corpus: one file of each kind people's photos come in, written with Pillow, OpenCV or by hand ---

def _png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    import struct
    import zlib

    value = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", value & 0xFFFFFFFF)


def _with_png_chunk(png: bytes, chunk: bytes) -> bytes:
    # After the signature (8 bytes) and IHDR (25): where optional chunks such as gAMA and tEXt go.
    return png[:33] + chunk + png[33:]


def _bmp16(rgb: np.ndarray, green_bits: int) -> bytes:
    """A 16-bit BMP, bottom-up: RGB565 with BI_BITFIELDS masks, or RGB555 as plain BI_RGB (its default layout)."""
    import struct

    height, width = rgb.shape[:2]
    red = rgb[..., 0].astype(np.uint16) >> 3
    green = rgb[..., 1].astype(np.uint16) >> (8 - green_bits)
    blue = rgb[..., 2].astype(np.uint16) >> 3
    pixels = (red << (5 + green_bits)) | (green << 5) | blue
    row_bytes = (width * 2 + 3) // 4 * 4
    rows = b"".join(pixels[y].astype("<u2").tobytes().ljust(row_bytes, b"\0") for y in range(height - 1, -1, -1))
    compression, masks = (3, struct.pack("<III", 0xF800, 0x07E0, 0x001F)) if green_bits == 6 else (0, b"")
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 16, compression, len(rows), 2835, 2835, 0, 0) + masks
    offset = 14 + len(info)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + info + rows


def _pnm(rgb: np.ndarray, maxval: int, grey: bool) -> bytes:
    """A binary PGM (P5) or PPM (P6) with this ``maxval``: samples scaled to it, two bytes big-endian above 255."""
    height, width = rgb.shape[:2]
    pixels = rgb.astype(np.float64).mean(axis=2) if grey else rgb.astype(np.float64)
    samples = np.round(pixels / 255.0 * maxval).astype(">u2" if maxval > 255 else np.uint8)
    magic = b"P5" if grey else b"P6"
    return magic + b"\n%d %d\n%d\n" % (width, height, maxval) + samples.tobytes()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _ycck(jpeg_cmyk: bytes) -> bytes:
    """A CMYK JPEG relabelled YCCK: its Adobe APP14 marker's transform byte set to 2, so decoders run the YCC to
    RGB step on the first three components (a valid YCCK file, with other colours than the CMYK one)."""
    adobe = jpeg_cmyk.index(b"Adobe", jpeg_cmyk.index(b"\xff\xee"))  # APP14: FFEE, its length, then "Adobe"
    transform_at = adobe + 11  # "Adobe", version (2), flags0 (2), flags1 (2), then the transform
    return jpeg_cmyk[:transform_at] + b"\x02" + jpeg_cmyk[transform_at + 1:]


DECODE_CORPUS_KINDS = (
    "jpeg_baseline", "jpeg_progressive", "jpeg_cmyk", "jpeg_ycck",
    *(f"jpeg_exif{n}" for n in range(1, 9)),
    "png_rgb", "png_grey", "png_grey16", "png_rgb16", "png_grey_alpha", "png_rgba", "png_palette",
    "png_palette_trns", "png_text_bad_crc",
    "tiff_rgb", "tiff_cmyk", "tiff_rgb16", "tiff_grey16", "tiff_lzw",
    "bmp_24", "bmp_32", "bmp_565", "bmp_555",
    "pgm_255", "pgm_100", "pgm_4095", "pgm_65535", "ppm_255", "ppm_100", "ppm_4095", "ppm_65535",
    "webp_lossy", "webp_lossless", "webp_alpha", "webp_exif",
)


def write_decode_corpus(directory: Path, seed: int = 5) -> dict[str, Path]:
    """One file of every kind in :data:`DECODE_CORPUS_KINDS`, each a different picture, 160 x 120 (not square,
    so a turn shows). Returns ``{kind: path}``."""
    import cv2

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths: dict[str, Path] = {}

    def picture() -> Image.Image:
        return Image.fromarray(scene(rng, 160, 120))

    def path(kind: str, suffix: str) -> Path:
        paths[kind] = directory / f"{kind}{suffix}"
        return paths[kind]

    def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    picture().save(path("jpeg_baseline", ".jpg"), quality=90)
    picture().save(path("jpeg_progressive", ".jpg"), quality=90, progressive=True)
    cmyk = encoded(picture().convert("CMYK"), "JPEG", quality=90)
    path("jpeg_cmyk", ".jpg").write_bytes(cmyk)
    path("jpeg_ycck", ".jpg").write_bytes(_ycck(encoded(picture().convert("CMYK"), "JPEG", quality=90)))
    turns = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
             4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE], 6: [Image.Transpose.ROTATE_90],
             7: [Image.Transpose.TRANSVERSE], 8: [Image.Transpose.ROTATE_270], 1: []}
    for orientation, undo in turns.items():
        stored = picture()
        for step in undo:  # stored as the upright picture turned back, as a camera does
            stored = stored.transpose(step)
        stored.save(path(f"jpeg_exif{orientation}", ".jpg"), quality=90, exif=_exif(orientation))

    picture().save(path("png_rgb", ".png"))
    picture().convert("L").save(path("png_grey", ".png"))
    low = rng.integers(0, 256, (120, 160)).astype(np.uint16)  # every low byte set: rounding or clipping shows
    cv2.imwrite(str(path("png_grey16", ".png")), np.asarray(picture().convert("L")).astype(np.uint16) * 256 + low)
    rgb16 = np.asarray(picture()).astype(np.uint16) * 256 + low[..., None]
    cv2.imwrite(str(path("png_rgb16", ".png")), np.ascontiguousarray(rgb16[..., ::-1]))
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 160).astype(np.uint8), (120, 1)))
    grey_alpha = picture().convert("LA")
    grey_alpha.putalpha(alpha)
    grey_alpha.save(path("png_grey_alpha", ".png"))
    rgba = picture().convert("RGBA")
    rgba.putalpha(alpha)
    rgba.save(path("png_rgba", ".png"))
    picture().convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path("png_palette", ".png"))
    picture().convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path("png_palette_trns", ".png"),
                                                                          transparency=3)
    path("png_text_bad_crc", ".png").write_bytes(_with_png_chunk(
        encoded(picture(), "PNG"), _png_chunk(b"tEXt", b"Comment\0made by hand", crc=12345)))

    picture().save(path("tiff_rgb", ".tif"))
    picture().convert("CMYK").save(path("tiff_cmyk", ".tif"))
    cv2.imwrite(str(path("tiff_rgb16", ".tif")), np.ascontiguousarray(rgb16[..., ::-1]))
    cv2.imwrite(str(path("tiff_grey16", ".tif")), np.asarray(picture().convert("L")).astype(np.uint16) * 256 + low)
    picture().save(path("tiff_lzw", ".tif"), compression="tiff_lzw")

    picture().save(path("bmp_24", ".bmp"))
    cv2.imwrite(str(path("bmp_32", ".bmp")), cv2.cvtColor(np.asarray(rgba), cv2.COLOR_RGBA2BGRA))
    path("bmp_565", ".bmp").write_bytes(_bmp16(np.asarray(picture()), green_bits=6))
    path("bmp_555", ".bmp").write_bytes(_bmp16(np.asarray(picture()), green_bits=5))

    for maxval in (255, 100, 4095, 65535):
        path(f"pgm_{maxval}", ".pgm").write_bytes(_pnm(np.asarray(picture()), maxval, grey=True))
        path(f"ppm_{maxval}", ".ppm").write_bytes(_pnm(np.asarray(picture()), maxval, grey=False))

    picture().save(path("webp_lossy", ".webp"), quality=85)
    picture().save(path("webp_lossless", ".webp"), lossless=True)
    rgba.save(path("webp_alpha", ".webp"), quality=85)
    picture().save(path("webp_exif", ".webp"), quality=85, exif=_exif(6))
    assert set(paths) == set(DECODE_CORPUS_KINDS)
    return paths
