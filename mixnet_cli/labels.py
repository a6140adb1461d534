"""ImageNet-1k class names, read verbatim from the label list paddleclas ships.

The file is located without importing paddleclas (whose ``__init__`` takes seconds to run).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from .errors import ManifestError
from .manifest import load_manifest


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ManifestError(f"the label list needs the '{package}' package; run `pip install {package}`")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """Class names indexed by class id, e.g. ``imagenet_labels()[281] == "tabby, tabby cat"``."""
    source = load_manifest().labels
    path = _package_dir(source.package) / source.path
    names: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        class_id, _, name = line.partition(" ")
        names[int(class_id)] = name.strip()
    if sorted(names) != list(range(source.num_classes)):
        raise ManifestError(f"{path} does not list classes 0..{source.num_classes - 1}; reinstall {source.package}")
    return tuple(names[i] for i in range(source.num_classes))


@lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """WordNet synset ids indexed by class id (``n01440764`` is class 0): PaddleClas's classes are the sorted synsets."""
    from importlib import resources

    source = load_manifest().labels
    text = resources.files("mixnet_cli").joinpath(source.synsets).read_text(encoding="utf-8")
    synsets = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(synsets) != source.num_classes or list(synsets) != sorted(synsets):
        raise ManifestError(f"{source.synsets} must list {source.num_classes} sorted synset ids; reinstall mixnet-cli")
    return synsets
