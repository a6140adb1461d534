"""ImageNet-1k class names and synset ids, from files shipped in this package.

The class names are PaddleClas's ``ppcls/utils/imagenet1k_label_list.txt``, verbatim (a test compares the two
where paddleclas is installed), so labels need no paddleclas.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from .errors import ManifestError
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
