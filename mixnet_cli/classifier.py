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
from typing import Any, Iterable, Iterator, Sequence, Sized

import numpy as np

from .base import settings
from .engines.choice import DeviceChoice, Engine, EngineChoice, choose_engine, create_engine
from .images.postprocess import softmax
from .base.errors import ImageError, MixnetError, UsageError
from .images.inputs import InputItem, fetch_image_url, is_url
from .images.labels import imagenet_labels, read_label_file
from .base.manifest import ModelSpec, resolve_model
from .images.preprocess import ImageInput, load_and_transform
from .weights.store import VerifiedWeights, custom_weights, ensure_weights


@dataclass(frozen=True)
class Prediction:
    class_id: int
    label: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"class_id": self.class_id, "label": self.label, "score": self.score}


@dataclass(frozen=True)
class ClassificationResult:
    """The answer for one input: its predictions, or the error that stopped it (never both). ``features``: the
    pooled ``1536`` float32 features the classifier read, for a classifier made with ``features=True``."""

    input: str
    model: str
    predictions: tuple[Prediction, ...] = ()
    error: MixnetError | None = field(default=None, compare=False)
    features: np.ndarray | None = field(default=None, compare=False, repr=False)

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
        row: dict[str, Any] = {
            "input": self.input,
            "model": self.model,
            "predictions": [p.to_dict() for p in self.predictions],
        }
        if self.features is not None:
            row["features"] = [float(value) for value in self.features]
        return row




# Below this many images a job is small: the latency-mode engine that classified the first ones finishes it.
# From here on the engine's throughput mode (its own compiled model, loaded once) pays for itself.
BULK_AFTER_IMAGES = 32


def _input_name(image: ImageInput | InputItem) -> str:
    if isinstance(image, InputItem):
        return image.name
    if isinstance(image, (str, Path)):
        return str(image)
    return f"<{type(image).__name__}>"


class Classifier:
    """One MixNet model, with its weights verified and loaded, ready to classify images.

    ``model`` accepts ``S``, ``MixNet_S``, ``mixnet_s``... (default MixNet_S); ``device`` is ``auto``, ``cpu``,
    ``gpu`` or ``gpu:N``. The weights are downloaded on first use (``mirrors``, ``offline`` as for ``mixnet
    download``). ``engine`` is ``auto`` (the fastest installed for the device) or a name from
    :mod:`mixnet_cli.engines` (``onnxruntime``, ``openvino``; ``paddle`` and ``dygraph`` with the [paddle] extra);
    ``threads`` caps the CPU threads of a forward pass (default: ``OMP_NUM_THREADS`` when set, else the physical
    cores).

    Your own fine-tuned MixNet: ``weights`` is its ``.pdparams`` file (any number of classes; the architecture is
    detected from it unless ``model`` is given: :func:`~mixnet_cli.weights.store.custom_weights`), ``labels`` its class
    names (PaddleClas's ``<id> <name>`` per line, or one name per line: :func:`~mixnet_cli.images.labels.read_label_file`).
    Without ``labels``, 1000 classes are ImageNet's and other counts are named by their class id.

    ``precision="bf16"`` (opt-in) runs OpenVINO in bf16 on a CPU with bf16 arithmetic (avx512_bf16 or AMX;
    elsewhere :class:`~mixnet_cli.base.errors.DeviceError`): 1.45-1.75x fp32's throughput at batch 8, answers
    close to fp32's but not within its 1e-4 (README, "Precision"). For timing other arithmetic (``mixnet benchmark``):
    ``tf32``, ``bf16`` or ``fp16`` on the ``torch`` engine, and ``compile`` (``torch.compile``). Only fp32, the
    default, is held to the reference.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "auto",
        mirrors: Sequence[str] | None = None,
        offline: bool | None = None,
        progress: bool | None = None,
        engine: str = "auto",
        threads: int | None = None,
        weights: str | Path | None = None,
        labels: str | Path | None = None,
        features: bool = False,
        precision: str = "fp32",
        compile: bool = False,
    ) -> None:
        named = resolve_model(model) if model is not None else None
        if threads is None:
            threads = settings.cpu_threads()
        # Engine and device first: a missing GPU or engine is reported before any download.
        choice = choose_engine(engine, device, precision, compile, model=named.name if named else None,
                               threads=threads)
        self.weights: VerifiedWeights
        names: tuple[str, ...] | None = None
        if weights is not None:
            self.weights = custom_weights(weights, named)
        else:
            released = named or resolve_model("MixNet_S")
            if labels is not None:
                # The released weights' class count is the manifest's: a label file of another count is refused
                # now, not after a download (with its retries, long when offline).
                names = read_label_file(labels, released.num_classes, released=released.name)
            self.weights = ensure_weights(released, mirrors=mirrors, offline=offline, progress=progress)
        self.spec: ModelSpec = self.weights.spec
        self.labels: tuple[str, ...]
        if names is not None:
            self.labels = names
        elif labels is not None:
            self.labels = read_label_file(labels, self.spec.num_classes)
        elif self.spec.num_classes == 1000:
            self.labels = imagenet_labels()
        else:
            self.labels = tuple(str(class_id) for class_id in range(self.spec.num_classes))
        self.engine: Engine
        self.engine_choice: EngineChoice
        self.features = features
        self.engine, self.engine_choice = create_engine(self.spec, self.weights, choice, threads=threads,
                                                        features=features)
        self.device_choice: DeviceChoice = self.engine_choice.device_choice

    def __repr__(self) -> str:
        return (f"Classifier(model={self.spec.name!r}, engine={self.engine.name!r}, "
                f"device={self.device_choice.device!r}, weights={str(self.weights.path)!r})")

    @property
    def model_name(self) -> str:
        return self.spec.name

    def preprocess(self, image: ImageInput | InputItem, name: str | None = None) -> np.ndarray:
        """One image as the network's 3xSxS float32 input (PaddleClas's evaluation transform).

        ``image`` is what the command line takes, resolved the same way: a path (``str`` or ``Path``), an
        http(s) URL (downloaded with ``MIXNET_TIMEOUT``, ``MIXNET_RETRIES`` and ``MIXNET_URL_DEADLINE``), an
        :class:`~mixnet_cli.images.inputs.InputItem`; or encoded bytes, a PIL image, an HxWx3 RGB (HxW grey, HxWx4 RGBA)
        uint8 array. Raises :class:`~mixnet_cli.base.errors.ImageError` for anything wrong with it."""
        if isinstance(image, InputItem):
            image = image.load()
        elif is_url(image):
            image = fetch_image_url(image)  # type: ignore[arg-type]
        return load_and_transform(image, self.spec.preprocessing, name)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.engine.run(batch)

    def probabilities(self, arrays: Sequence[np.ndarray], engine: Engine | None = None) -> np.ndarray:
        """Softmax probabilities (``N x 1000`` float32) of preprocessed images (each ``3 x S x S`` float32), in one
        forward pass on ``engine`` (default: this classifier's latency-mode engine)."""
        return softmax((engine or self.engine).run(np.stack(arrays)))

    def result(self, name: str, probabilities: np.ndarray, topk: int,
               features: np.ndarray | None = None) -> ClassificationResult:
        """The result for one image from its row of :meth:`probabilities`: the ``topk`` classes, best first (ties
        in class order), with its pooled ``features`` when given."""
        order = np.argsort(-probabilities, kind="stable")[:topk]
        predictions = tuple(
            Prediction(class_id=int(i), label=self.labels[int(i)], score=float(probabilities[i])) for i in order
        )
        return ClassificationResult(input=name, model=self.spec.name, predictions=predictions, features=features)

    def _results(self, engine: Engine, names: list[str], arrays: list[np.ndarray],
                 topk: int) -> list[ClassificationResult]:
        batch = np.stack(arrays)
        if self.features:
            logits, features = engine.run_with_features(batch)  # type: ignore[attr-defined]
        else:
            logits, features = engine.run(batch), None
        return [self.result(name, row, topk, features=None if features is None else features[index])
                for index, (name, row) in enumerate(zip(names, softmax(logits)))]

    def engine_for(self, count: int, batch_size: int) -> Engine:
        """The engine a job of ``count`` images runs on: more than :data:`BULK_AFTER_IMAGES` take the engine's
        throughput mode (ONNX Runtime's one-thread sessions side by side, OpenVINO's streams; the paddle engines
        are the same in both)."""
        return self.engine.throughput(batch_size) if count > BULK_AFTER_IMAGES else self.engine

    def classify(self, image: ImageInput | InputItem, *, topk: int | None = None,
                 name: str | None = None) -> ClassificationResult:
        """Classify one image (any input :meth:`preprocess` takes, URLs included); an unreadable image raises its
        :class:`~mixnet_cli.base.errors.ImageError`."""
        label = name or _input_name(image)
        topk = check_topk(topk, len(self.labels))
        return self._results(self.engine, [label], [self.preprocess(image, label)], topk)[0]

    def classify_many(
        self,
        images: Iterable[ImageInput | tuple[str, ImageInput] | InputItem],
        *,
        topk: int | None = None,
        batch_size: int = 4,
        workers: int = 2,
    ) -> Iterator[ClassificationResult]:
        """Classify images in input order, in batches, decoding ahead in threads while the engine runs.

        Items are images, ``(name, image)`` pairs or :class:`~mixnet_cli.images.inputs.InputItem`. A bad image yields a
        result with ``error`` set and the rest go on; results are yielded in input order as soon as their batch
        is done. The engine's throughput mode (:meth:`~mixnet_cli.engines.choice.Engine.throughput`) runs jobs of more
        than :data:`BULK_AFTER_IMAGES` images (from the start when ``images`` has a length, else from there on),
        with as many batches in flight as it runs at once.
        """
        topk = check_topk(topk, len(self.labels))
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        if workers < 1:
            raise UsageError(f"decode workers must be at least 1, got {workers}")

        def prepare(item: ImageInput | tuple[str, ImageInput] | InputItem) -> tuple[str, np.ndarray | MixnetError]:
            image: ImageInput | InputItem = item  # type: ignore[assignment]
            if isinstance(item, InputItem):
                name = item.name
            else:
                name, image = item if isinstance(item, tuple) else (_input_name(item), item)
            try:
                # A URL is fetched here, in a decode thread, while the engine runs.
                return name, self.preprocess(item if isinstance(item, InputItem) else image, name)
            except MixnetError as exc:
                return name, exc
            except Exception as exc:  # noqa: BLE001 - whatever one input raises is that input's error, never the run's
                text = (str(exc).strip().splitlines() or [""])[0][:200]
                return name, ImageError(f"{name}: cannot read ({type(exc).__name__}: {text}); check the input")

        # A job known to be large starts in bulk mode; others switch once they prove large.
        engine = self.engine_for(len(images), batch_size) if isinstance(images, Sized) else self.engine
        bulk = engine is not self.engine
        # In input order: a batch being classified, or the result of an image that failed to decode.
        outputs: deque[Future[list[ClassificationResult]] | ClassificationResult] = deque()
        batches_in_flight = 0
        submitted = 0
        decoders = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mixnet-decode")
        # The engine is driven from its own threads, so that this one keeps the decoders fed meanwhile.
        # One more than the engine can run at once (OpenVINO makes at most one stream per thread).
        runners = ThreadPoolExecutor(max_workers=(self.engine.threads or 1) + 1, thread_name_prefix="mixnet-infer")
        try:
            decoding: deque[Future[tuple[str, np.ndarray | MixnetError]]] = deque()
            iterator = iter(images)
            exhausted = False
            names: list[str] = []
            arrays: list[np.ndarray] = []

            def submit_batch() -> None:
                nonlocal names, arrays, batches_in_flight, submitted, engine, bulk
                if not bulk and submitted >= BULK_AFTER_IMAGES:  # an input without a length has proved large
                    engine, bulk = self.engine_for(submitted + 1, batch_size), True
                outputs.append(runners.submit(self._results, engine, names, arrays, topk))
                batches_in_flight += 1
                submitted += len(names)
                names, arrays = [], []

            while True:
                # Enough decodes ahead to fill every batch in flight and the next, never the whole input.
                ahead = batch_size * (engine.parallel + 2) + workers
                while not exhausted and len(decoding) < ahead:
                    try:
                        decoding.append(decoders.submit(prepare, next(iterator)))
                    except StopIteration:
                        exhausted = True
                if decoding:
                    name, prepared = decoding.popleft().result()
                    if isinstance(prepared, MixnetError):
                        if arrays:  # keep input order: what came before the failed image goes first
                            submit_batch()
                        outputs.append(ClassificationResult(input=name, model=self.spec.name, error=prepared))
                    else:
                        names.append(name)
                        arrays.append(prepared)
                        if len(arrays) == batch_size:
                            submit_batch()
                elif arrays:
                    submit_batch()  # the last, partial batch
                # Hand back what is done, in order; wait for the oldest batch when enough are in flight already.
                while outputs:
                    head = outputs[0]
                    if isinstance(head, Future):
                        if not head.done() and batches_in_flight <= engine.parallel and (decoding or arrays):
                            break
                        batches_in_flight -= 1
                        outputs.popleft()
                        yield from head.result()
                    else:
                        outputs.popleft()
                        yield head
                if not decoding and not arrays and not outputs:
                    break
        finally:
            # A consumer that stops early (or an interrupt) leaves no decode running behind it.
            decoders.shutdown(wait=True, cancel_futures=True)
            runners.shutdown(wait=True, cancel_futures=True)


DEFAULT_TOPK = 5


def check_topk(topk: int | None, num_classes: int) -> int:
    """``topk``, checked (:class:`UsageError` unless ``1 <= topk <= num_classes``); None is the default: 5, or
    every class of a model with fewer."""
    if topk is None:
        return min(DEFAULT_TOPK, num_classes)
    if not 1 <= topk <= num_classes:
        raise UsageError(f"top-k must be between 1 and {num_classes} (the model's classes), got {topk}")
    return topk
