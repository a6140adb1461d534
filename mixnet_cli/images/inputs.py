"""Turning what the user names (files, directories, globs, URLs, stdin, list files) into images to classify.

Each input becomes an :class:`InputItem`: a display name and a loader that returns the image (a path or the
encoded bytes) when called. Loaders run in the classifier's decode threads, so URL downloads overlap inference.
An input that cannot become an image (a directory with no images, a glob that matches nothing, a URL that
fails) is still an item: its loader raises the one-line error, and the run goes on with the others.
"""

from __future__ import annotations

import errno
import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Union

from .encoded import IMAGE_SUFFIXES, MAX_IMAGE_BYTES
from ..base.errors import ImageError, ImageNotFoundError, ImageTooLargeError, ImageUnreadableError, NotAnImageError, UsageError

_GLOB_CHARS = frozenset("*?[")

ImageSource = Union[Path, bytes]


@dataclass(frozen=True)
class InputItem:
    """One input: its display ``name``, and ``load`` returning the image (a path or encoded bytes) when called.
    ``problem``: the error already known when the arguments were expanded (a missing file, an empty directory,
    a glob matching nothing); ``load`` raises it."""

    name: str
    load: Callable[[], ImageSource]
    problem: ImageError | None = None


def _failed(name: str, error: ImageError) -> InputItem:
    return InputItem(name, _fail(error), problem=error)


class NoImagesError(ImageNotFoundError):
    """A directory or glob that names no image files."""


class ImageDownloadError(ImageError):
    """An image URL that could not be fetched."""


def display_name(text: str) -> str:
    """A name that can be printed and put in JSON: bytes of a file name that are not UTF-8 (which Python keeps as
    lone surrogates) are shown as ``\\xff`` escapes instead of breaking the output."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _fail(error: ImageError) -> Callable[[], ImageSource]:
    def raise_error() -> ImageSource:
        raise error

    return raise_error


def _path_loader(path: Path) -> Callable[[], ImageSource]:
    return lambda: path


def is_url(argument: object) -> bool:
    """Whether ``argument`` is a string naming an http(s) URL."""
    return isinstance(argument, str) and argument.lower().startswith(("http://", "https://"))


def fetch_image_url(url: str, *, max_bytes: int = MAX_IMAGE_BYTES, deadline_s: float | None = None) -> bytes:
    """Download one image URL into memory through the one HTTP layer (:func:`mixnet_cli.base.http.fetch_bytes`:
    its session, timeouts and retries), within ``deadline_s`` (default ``MIXNET_URL_DEADLINE``) and ``max_bytes``.
    Raises :class:`ImageDownloadError` or :class:`ImageTooLargeError`, naming the URL."""
    from ..base.http import ResponseTooLarge, fetch_bytes
    from ..base.errors import DownloadError

    try:
        return fetch_bytes(url, max_bytes=max_bytes, deadline_s=deadline_s)
    except ResponseTooLarge as exc:
        raise ImageTooLargeError(f"{exc} for images") from None
    except DownloadError as exc:
        message = str(exc)
        raise ImageDownloadError(message if url in message else f"{url}: {message}") from None


def _read_stream(stream: BinaryIO, name: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{name}: more than {max_bytes} bytes, over the limit for images")
    return data


def directory_images(directory: Path, recursive: bool = True, *,
                     unreadable: list[Path] | None = None) -> list[Path]:
    """Image files under ``directory`` (by suffix, regular files only: never a FIFO, which would block the reader),
    in a stable sorted order; hidden entries are skipped. A broken symbolic link with an image's name is listed
    too (reading it gives its error: a photo that is not there is not silently left out). Directories that cannot
    be listed are appended to ``unreadable`` when a list is given (else skipped)."""
    found: list[Path] = []

    def listing_failed(error: OSError) -> None:
        if unreadable is not None and error.filename is not None:
            unreadable.append(Path(error.filename))

    for root, dirs, files in os.walk(directory, followlinks=False, onerror=listing_failed):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                path = Path(root) / name
                if path.is_file() or (path.is_symlink() and not path.exists()):
                    found.append(path)
    return found


def iter_glob(pattern: str) -> Iterator[str]:
    """The paths ``pattern`` matches, lazily and unsorted, named as ``glob.iglob(pattern, recursive=True)`` names
    them, except that ``**`` does not descend into symbolic links to directories, as a directory input does not:
    a link back up made glob go round the loop (one photo classified dozens of times, a large tree for minutes)
    and a linked folder gave its photos twice. That is pathlib's rule for ``**`` (``Path.glob`` on every
    supported Python); hidden files and folders stay unmatched unless the pattern names one, as in glob. A
    pattern holding a NUL byte matches nothing."""
    if "\0" in pattern:
        return
    segments = pattern.split("/")
    if "**" not in segments:  # (a "**" inside a segment is glob's "*", and pathlib refuses it before 3.13)
        yield from glob.iglob(pattern)  # no recursion, no loop
        return
    fixed = 0
    while fixed < len(segments) - 1 and not (_GLOB_CHARS & set(segments[fixed])):
        fixed += 1
    root = "/".join(segments[:fixed]) or ("/" if pattern.startswith("/") else "")
    rest = segments[fixed:]
    if rest[-1] == "**":  # glob's "photos/**" is everything below photos; pathlib's, its folders alone
        rest.append("*")
    hidden_named = any(segment.startswith(".") for segment in rest)
    base = Path(root or ".")
    for match in base.glob("/".join(rest)):
        below = match.relative_to(base).parts
        if hidden_named or not any(part.startswith(".") for part in below):
            relative = "/".join(below)
            yield relative if not root else root + relative if root.endswith("/") else f"{root}/{relative}"


def _expand_one(argument: str, recursive: bool, stdin: BinaryIO | None) -> Iterator[InputItem]:
    if argument == "-":
        source = stdin if stdin is not None else sys.stdin.buffer
        if source.isatty():
            raise UsageError(
                "'-' reads an image from stdin, but stdin is a terminal; pipe one in: mixnet classify - < cat.jpg"
            )
        try:
            data = _read_stream(source, "-")
        except ImageError as exc:  # too large: this input's error, in its row
            yield _failed("-", exc)
            return
        yield InputItem("-", lambda: data)
        return
    if is_url(argument):
        yield InputItem(argument, lambda: fetch_image_url(argument))
        return
    label = display_name(argument)
    path = Path(argument).expanduser()
    if path.is_dir():
        unreadable: list[Path] = []
        images = directory_images(path, recursive, unreadable=unreadable)
        for directory in unreadable:
            shown = display_name(str(directory))
            yield _failed(shown, ImageUnreadableError(f"{shown}: directory cannot be read (permission denied?); "
                                                      "check its permissions"))
        if unreadable and not images:
            return
        if not images:
            where = "or its sub-directories " if recursive else ""
            yield _failed(label, NoImagesError(
                f"{label}: directory {where}has no image files ({', '.join(sorted(IMAGE_SUFFIXES)[:6])}...)"
            ))
        for image in images:
            shown = display_name(str(image))
            yield _broken_link(image, shown) or InputItem(shown, _path_loader(image))
        return
    if not os.path.lexists(path) and _GLOB_CHARS & set(argument):
        matches = sorted(iter_glob(argument))
        files = [Path(m) for m in matches if Path(m).suffix.lower() in IMAGE_SUFFIXES
                 and (Path(m).is_file() or (Path(m).is_symlink() and not Path(m).exists()))]
        if not files:
            yield _failed(label, NoImagesError(f"{label}: pattern matches no image files"))
        for image in files:
            shown = display_name(str(image))
            yield _broken_link(image, shown) or InputItem(shown, _path_loader(image))
        return
    broken = _broken_link(path, label)
    if broken is not None:
        yield broken
        return
    if not os.path.lexists(path):
        yield _failed(label, ImageNotFoundError(f"{label}: no such file; check the path"))
        return
    problem = _not_an_image_file(path, label)
    if problem is not None:
        yield _failed(label, problem)
        return
    yield InputItem(label, _path_loader(path))


def _broken_link(path: Path, label: str) -> InputItem | None:
    """The failed item of a symbolic link whose target is missing (None for anything else)."""
    if not (path.is_symlink() and not path.exists()):
        return None
    return _failed(label, ImageNotFoundError(
        f"{label}: broken symbolic link (to {display_name(os.readlink(path))}); fix or remove the link"))


def _not_an_image_file(path: Path, label: str) -> ImageError | None:
    """What is wrong with ``path`` that shows without reading it: empty, a FIFO or socket (opening one would block
    or fail), a symbolic-link loop. None when it looks readable (the decoder then has its say)."""
    import stat

    try:
        info = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return ImageNotFoundError(f"{label}: symbolic link loop; fix or remove the link")
        return None  # the decoder reports it, with its own words
    if stat.S_ISFIFO(info.st_mode) or stat.S_ISSOCK(info.st_mode):
        return NotAnImageError(f"{label}: a named pipe or socket, not an image file; pass image files")
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        return NotAnImageError(f"{label}: empty file (0 bytes); pass an image file")
    return None


def read_list_file(list_file: str, stdin: BinaryIO | None = None) -> list[str]:
    """The paths/URLs in a ``--files-from`` file (``-`` for stdin): one per line; blank lines and lines
    starting with ``#`` are ignored."""
    try:
        if list_file == "-":
            raw = (stdin if stdin is not None else sys.stdin.buffer).read()
        else:
            raw = Path(list_file).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"--files-from {list_file}: no such file") from None
    except OSError as exc:
        raise UsageError(f"--files-from {list_file}: cannot read ({exc.strerror or exc})") from None
    text = raw.decode("utf-8", errors="surrogateescape")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def expand_inputs(
    arguments: Iterable[str], *, recursive: bool = True, stdin: BinaryIO | None = None
) -> list[InputItem]:
    """Every argument expanded, in order: directories to their images (sorted), globs to their matches."""
    items: list[InputItem] = []
    stdin_used = False
    for argument in arguments:
        if argument == "-":
            if stdin_used:
                raise UsageError("'-' (an image on stdin) can be given only once")
            stdin_used = True
        try:
            items.extend(_expand_one(argument, recursive, stdin))
        except PermissionError:
            items.append(_failed(display_name(argument), ImageUnreadableError(
                f"{display_name(argument)}: permission denied; check the permissions"
            )))
    return items
