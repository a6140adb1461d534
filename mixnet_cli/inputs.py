"""Turning command-line arguments into a stream of images to classify."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)


def _directory_images(directory: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(root) / name)
    return found


def expand_paths(arguments: Iterable[str]) -> Iterator[tuple[str, Path]]:
    """Each argument as ``(name, path)``; directories expand to their image files, recursively, sorted.

    Paths that do not exist are passed through unchanged: the decoder reports them as one failed input each.
    """
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            for image in _directory_images(path):
                yield str(image), image
        else:
            yield argument, path
