"""Generated test images: natural-looking content (smooth gradients, shapes, soft colour blobs) in every file
kind and pixel format the classifier has to read the way PaddleClas's cv2 decoder does.

Pure noise would make poor test images: a network sees noise as one texture, so every noise image gets the same
answer. Gradients and shapes give each image its own statistics, and so its own confident answer from the
calibrated test weights.
"""

from __future__ import annotations

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
