"""ImageNet-1k class names and synset ids, from files shipped in this package.

The class names are PaddleClas's ``ppcls/utils/imagenet1k_label_list.txt``, verbatim (a test compares the two
where paddleclas is installed), so labels need no paddleclas.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import re
from pathlib import Path

from ..base.errors import ManifestError, UsageError
from ..base.manifest import load_manifest


def _package_text(name: str) -> str:
    return resources.files("mixnet_cli").joinpath(name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """Class names indexed by class id, e.g. ``imagenet_labels()[281] == "tabby, tabby cat"``."""
    source = load_manifest().labels
    try:
        names = class_names(_package_text(source.file))
    except ValueError as exc:
        raise ManifestError(f"{source.file}: {exc}; reinstall mixnet-cli") from None
    if len(names) != source.num_classes:
        raise ManifestError(f"{source.file} does not list classes 0..{source.num_classes - 1}; reinstall mixnet-cli")
    return names


@lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """WordNet synset ids indexed by class id (``n01440764`` is class 0): PaddleClas's classes are the sorted synsets."""
    source = load_manifest().labels
    text = _package_text(source.synsets)
    synsets = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(synsets) != source.num_classes or list(synsets) != sorted(synsets):
        raise ManifestError(f"{source.synsets} must list {source.num_classes} sorted synset ids; reinstall mixnet-cli")
    return synsets


_ID_AND_NAME = re.compile(r"^\s*(\d+)\s+(\S.*?)\s*$")


def class_names(text: str) -> tuple[str, ...]:
    """Class names indexed by class id from a label file's text: PaddleClas's ``<id> <name>`` per line (every id
    from 0 up once, in any order) when every line starts with a number, else one name per line in class order;
    blank lines skipped. Raises ``ValueError`` saying which line or id is wrong."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not (lines and all(line.strip().split(maxsplit=1)[0].isdigit() for line in lines)):
        return tuple(line.strip() for line in lines)
    names: dict[int, str] = {}
    for number, line in enumerate(lines, start=1):
        match = _ID_AND_NAME.match(line)
        if match is None:
            raise ValueError(f"line {number} has an id but no name: {line.strip()!r}")
        class_id = int(match.group(1))
        if class_id in names:
            raise ValueError(f"class id {class_id} appears twice (line {number})")
        names[class_id] = match.group(2)
    if sorted(names) != list(range(len(names))):
        missing = min(set(range(len(names))) - set(names))
        raise ValueError(f"ids must run from 0 to {len(names) - 1}, each once; {missing} is missing")
    return tuple(names[i] for i in range(len(names)))


def read_label_file(path: Path | str, num_classes: int, *, released: str | None = None) -> tuple[str, ...]:
    """Class names for your own weights, indexed by class id, from ``path``: PaddleClas's ``class_id_map_file``
    format (``<id> <name>`` per line, every id from 0 to ``num_classes - 1`` once, in any order) or one name per
    line in class order; blank lines are skipped. Raises :class:`UsageError` naming the file when it cannot be read
    or its count is not ``num_classes`` (the weights' classes; ``released`` names the released model whose they
    are, when the names are for it rather than for your own weights)."""
    source = Path(path).expanduser()
    try:
        text = source.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"--labels {source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--labels {source}: cannot read it as UTF-8 text ({exc})") from None
    try:
        names_found = class_names(text)
    except ValueError as exc:
        raise UsageError(f"--labels {source}: {exc}") from None
    if len(names_found) != num_classes and released is not None:
        raise UsageError(f"--labels {source} names {len(names_found)} classes, but {released}'s released weights have "
                         f"{num_classes}; give a label file of {num_classes} names, or your own weights with --weights")
    if len(names_found) != num_classes:
        raise UsageError(f"--labels {source} names {len(names_found)} classes, but the weights have {num_classes}; "
                         "give the label file these weights were trained with")
    return names_found
