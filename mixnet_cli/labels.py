"""ImageNet-1k class names and synset ids, from files shipped in this package.

The class names are PaddleClas's ``ppcls/utils/imagenet1k_label_list.txt``, verbatim (a test compares the two
where paddleclas is installed), so labels need no paddleclas.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import re
from pathlib import Path

from .errors import ManifestError, UsageError
from .manifest import load_manifest


def _package_text(name: str) -> str:
    return resources.files("mixnet_cli").joinpath(name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """Class names indexed by class id, e.g. ``imagenet_labels()[281] == "tabby, tabby cat"``."""
    source = load_manifest().labels
    names: dict[int, str] = {}
    for line in _package_text(source.file).splitlines():
        if not line.strip():
            continue
        class_id, _, name = line.partition(" ")
        names[int(class_id)] = name.strip()
    if sorted(names) != list(range(source.num_classes)):
        raise ManifestError(f"{source.file} does not list classes 0..{source.num_classes - 1}; reinstall mixnet-cli")
    return tuple(names[i] for i in range(source.num_classes))


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


def read_label_file(path: Path | str, num_classes: int) -> tuple[str, ...]:
    """Class names for your own weights, indexed by class id, from ``path``: PaddleClas's ``class_id_map_file``
    format (``<id> <name>`` per line, every id from 0 to ``num_classes - 1`` once, in any order) or one name per
    line in class order; blank lines are skipped. Raises :class:`UsageError` naming the file when it cannot be read
    or its count is not ``num_classes`` (the weights' classes)."""
    source = Path(path).expanduser()
    try:
        text = source.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"--labels {source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--labels {source}: cannot read it as UTF-8 text ({exc})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    matches = [_ID_AND_NAME.match(line) for line in lines]
    if lines and all(matches):
        ids = [int(m.group(1)) for m in matches if m]
        if sorted(ids) == list(range(len(ids))):
            names = {int(m.group(1)): m.group(2) for m in matches if m}
            lines = [names[i] for i in range(len(ids))]
    names_found = tuple(line.strip() for line in lines)
    if len(names_found) != num_classes:
        raise UsageError(f"--labels {source} names {len(names_found)} classes, but the weights have {num_classes}; "
                         "give the label file these weights were trained with")
    return names_found
