"""The Python API: load a model once, classify many images.

    from mixnet_cli import Classifier
    classifier = Classifier("MixNet_L")
    result = classifier.classify("cat.jpg")
    result.predictions[0].label      # 'tabby, tabby cat'
    result.to_dict()                 # the JSON object the CLI prints
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .engine import DeviceChoice, Engine, EngineChoice, choose_engine, create_engine, softmax
from .errors import MixnetError, UsageError
from .inputs import InputItem
from .labels import imagenet_labels
from .manifest import ModelSpec, resolve_model
from .preprocess import ImageInput, load_and_transform
from .weights import VerifiedWeights, ensure_weights


@dataclass(frozen=True)
class Prediction:
    class_id: int
    label: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"class_id": self.class_id, "label": self.label, "score": self.score}


@dataclass(frozen=True)
class ClassificationResult:
    """The answer for one input: its predictions, or the error that stopped it (never both)."""

    input: str
    model: str
    predictions: tuple[Prediction, ...] = ()
    error: MixnetError | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {
                "input": self.input,
                "model": self.model,
                "error": {"type": type(self.error).__name__, "message": str(self.error)},
            }
        return {
            "input": self.input,
            "model": self.model,
            "predictions": [p.to_dict() for p in self.predictions],
        }




def _input_name(image: ImageInput) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return f"<{type(image).__name__}>"


class Classifier:
    """One MixNet model, with its weights verified and loaded, ready to classify images.

    ``model`` accepts ``S``, ``MixNet_S``, ``mixnet_s``...; ``device`` is ``auto``, ``cpu``, ``gpu`` or
    ``gpu:N``. The weights are downloaded on first use (``mirrors``, ``offline`` as for ``mixnet download``).
    ``engine`` is ``auto`` (the fastest installed for the device), ``onnxruntime``, ``paddle`` (Paddle
    Inference) or ``dygraph`` (paddle eager mode, the reference); ``threads`` caps the CPU threads of a forward
    pass (default: the physical cores).
    """

    def __init__(
        self,
        model: str = "MixNet_S",
        *,
        device: str = "auto",
        mirrors: Sequence[str] | None = None,
        offline: bool | None = None,
        progress: bool | None = None,
        engine: str = "auto",
        threads: int | None = None,
    ) -> None:
        self.spec: ModelSpec = resolve_model(model)
        # Engine and device first: a missing GPU or engine is reported before any download.
        choice = choose_engine(engine, device)
        self.weights: VerifiedWeights = ensure_weights(
            self.spec, mirrors=mirrors, offline=offline, progress=progress
        )
        self.engine: Engine
        self.engine_choice: EngineChoice
        self.engine, self.engine_choice = create_engine(self.spec, self.weights, choice, threads=threads)
        self.device_choice: DeviceChoice = self.engine_choice.device_choice
        self.labels = imagenet_labels()

    def __repr__(self) -> str:
        return (f"Classifier(model={self.spec.name!r}, engine={self.engine.name!r}, "
                f"device={self.device_choice.device!r}, weights={str(self.weights.path)!r})")

    @property
    def model_name(self) -> str:
        return self.spec.name

    def preprocess(self, image: ImageInput, name: str | None = None) -> np.ndarray:
        """One image as the network's 3xSxS float32 input (PaddleClas's evaluation transform)."""
        return load_and_transform(image, self.spec.preprocessing, name)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.engine.run(batch)

    def _results(self, names: list[str], batch: np.ndarray, topk: int) -> list[ClassificationResult]:
        probabilities = softmax(self.engine.run(batch))
        results = []
        for name, row in zip(names, probabilities):
            order = np.argsort(-row, kind="stable")[:topk]
            predictions = tuple(
                Prediction(class_id=int(i), label=self.labels[int(i)], score=float(row[i])) for i in order
            )
            results.append(ClassificationResult(input=name, model=self.spec.name, predictions=predictions))
        return results

    def classify(self, image: ImageInput, *, topk: int = 5, name: str | None = None) -> ClassificationResult:
        """Classify one image; an unreadable image raises its :class:`~mixnet_cli.errors.ImageError`."""
        label = name or _input_name(image)
        _check_topk(topk, len(self.labels))
        return self._results([label], self.preprocess(image, label)[None], topk)[0]

    def classify_many(
        self,
        images: Iterable[ImageInput | tuple[str, ImageInput] | InputItem],
        *,
        topk: int = 5,
        batch_size: int = 4,
        workers: int = 2,
    ) -> Iterator[ClassificationResult]:
        """Classify images in input order, in batches, decoding ahead in threads while the engine runs.

        Items are images, ``(name, image)`` pairs or :class:`~mixnet_cli.inputs.InputItem`. A bad image yields a result with ``error`` set and the rest
        go on; results are yielded as soon as their batch is done.
        """
        _check_topk(topk, len(self.labels))
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")

        def prepare(item: ImageInput | tuple[str, ImageInput] | InputItem) -> tuple[str, np.ndarray | MixnetError]:
            if isinstance(item, InputItem):
                name = item.name
            else:
                name, image = item if isinstance(item, tuple) else (_input_name(item), item)
            try:
                if isinstance(item, InputItem):
                    image = item.load()  # may fetch a URL: done here, in a decode thread
                return name, self.preprocess(image, name)
            except MixnetError as exc:
                return name, exc

        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mixnet-decode") as pool:
            # A bounded window of decodes in flight: enough to keep the engine fed, never the whole input in memory.
            window: deque[Future[tuple[str, np.ndarray | MixnetError]]] = deque()
            iterator = iter(images)
            limit = batch_size * 2 + workers
            pending_names: list[str] = []
            pending_arrays: list[np.ndarray] = []
            done = False
            while True:
                while not done and len(window) < limit:
                    try:
                        window.append(pool.submit(prepare, next(iterator)))
                    except StopIteration:
                        done = True
                if not window:
                    break
                name, prepared = window.popleft().result()
                if isinstance(prepared, MixnetError):
                    # Keep input order: flush what came before the failed image first.
                    if pending_arrays:
                        yield from self._results(pending_names, np.stack(pending_arrays), topk)
                        pending_names, pending_arrays = [], []
                    yield ClassificationResult(input=name, model=self.spec.name, error=prepared)
                    continue
                pending_names.append(name)
                pending_arrays.append(prepared)
                if len(pending_arrays) == batch_size:
                    yield from self._results(pending_names, np.stack(pending_arrays), topk)
                    pending_names, pending_arrays = [], []
            if pending_arrays:
                yield from self._results(pending_names, np.stack(pending_arrays), topk)


def _check_topk(topk: int, num_classes: int) -> None:
    if not 1 <= topk <= num_classes:
        raise UsageError(f"top-k must be between 1 and {num_classes}, got {topk}")
