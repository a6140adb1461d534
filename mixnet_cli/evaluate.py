"""`mixnet eval`: top-1 / top-5 accuracy on a labelled image set, as PaddleClas measures it.

Two layouts are read: a PaddleClas list file (``relative/path.JPEG 281`` per line, paths relative to a root
directory), and an ImageFolder whose sub-folders are synset ids (``n01440764/...``), mapped to class ids in
sorted synset order (PaddleClas's class order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from .base.errors import UsageError
from .images.inputs import InputItem, directory_images

if TYPE_CHECKING:
    from .classifier import ClassificationResult, Classifier


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    class_id: int


@dataclass(frozen=True)
class EvalSummary:
    model: str
    images: int
    failed: int
    top1: float
    top5: float
    images_per_s: float
    seconds: float
    architecture: str | None = None  # the network, when ``model`` is a fine-tune's name

    def to_dict(self) -> dict[str, object]:
        """Accuracy in percent, as PaddleClas publishes it (and as ``mixnet models`` shows it)."""
        return {
            "model": self.model,
            "architecture": self.architecture or self.model,
            "images": self.images,
            "failed": self.failed,
            "top1": round(self.top1 * 100, 4),
            "top5": round(self.top5 * 100, 4),
            "images_per_s": round(self.images_per_s, 2),
            "seconds": round(self.seconds, 3),
        }


def read_labelled_list(list_file: Path, root: Path | None = None, num_classes: int = 1000) -> list[LabelledImage]:
    """Samples from a PaddleClas list file: ``path label`` per line, paths relative to ``root``
    (default: the list file's directory)."""
    base = root if root is not None else list_file.parent
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"{list_file}: no such list file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{list_file}: cannot read the list file ({exc})") from None
    samples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        path, _, label = line.strip().rpartition(" ")
        if not path or not label.isdigit() or not 0 <= int(label) < num_classes:
            raise UsageError(
                f"{list_file}:{number}: expected '<image path> <class id 0-{num_classes - 1}>', got {line.strip()!r}"
            )
        samples.append(LabelledImage(base / path.strip(), int(label)))
    if not samples:
        raise UsageError(f"{list_file}: the list file names no images")
    return samples


def read_image_folder(root: Path, synsets: Sequence[str]) -> list[LabelledImage]:
    """Samples from ``root/<synset id>/<image>``; every sub-folder must be an ImageNet-1k synset id."""
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory; pass an ImageFolder (sub-folders named by synset id) or --list")
    class_of = {synset: index for index, synset in enumerate(synsets)}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UsageError(f"{root}: has no sub-folders; expected one per synset id (n01440764/, ...) or use --list")
    unknown = [f.name for f in folders if f.name not in class_of]
    if unknown:
        raise UsageError(
            f"{root}: sub-folder {unknown[0]!r} is not an ImageNet-1k synset id (like n01440764); "
            "use a list file (--list) for other layouts"
        )
    samples = [
        LabelledImage(image, class_of[folder.name]) for folder in folders for image in directory_images(folder)
    ]
    if not samples:
        raise UsageError(f"{root}: the synset folders hold no image files")
    return samples


def evenly_spaced(samples: Sequence[LabelledImage], limit: int | None) -> list[LabelledImage]:
    """``limit`` samples spread evenly through ``samples`` (all of them when ``limit`` is None or not smaller),
    so that a quick run sees every class of a sorted ImageFolder, not the first few."""
    if limit is None or limit >= len(samples):
        return list(samples)
    step = len(samples) / limit
    return [samples[int(i * step)] for i in range(limit)]


def evaluate(
    classifier: "Classifier",
    samples: Iterable[LabelledImage],
    *,
    batch_size: int = 4,
    on_result: Callable[["ClassificationResult", LabelledImage], None] | None = None,
) -> EvalSummary:
    """Classify every sample and count top-1 / top-5 hits; unreadable images are counted as failed, not scored."""
    sample_list = list(samples)
    items = [InputItem(str(s.path), (lambda p=s.path: p)) for s in sample_list]
    top1 = top5 = failed = 0
    started = time.perf_counter()
    for result, sample in zip(classifier.classify_many(items, batch_size=batch_size), sample_list):
        if not result.ok:
            failed += 1
        else:
            ids = [p.class_id for p in result.predictions]
            top1 += ids[0] == sample.class_id
            top5 += sample.class_id in ids
        if on_result is not None:
            on_result(result, sample)
    seconds = time.perf_counter() - started
    scored = len(sample_list) - failed
    return EvalSummary(
        model=classifier.model_name,
        architecture=classifier.architecture,
        images=scored,
        failed=failed,
        top1=top1 / scored if scored else 0.0,
        top5=top5 / scored if scored else 0.0,
        images_per_s=len(sample_list) / seconds if seconds > 0 else 0.0,
        seconds=seconds,
    )
