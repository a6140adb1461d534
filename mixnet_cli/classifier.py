"""The Python API: load a model once, classify many images.

    from mixnet_cli import Classifier
    classifier = Classifier("MixNet_L")
    result = classifier.classify("cat.jpg")
    result.predictions[0].label      # 'tabby, tabby cat'
    result.to_dict()                 # the JSON object the CLI prints
    classifier.classify("cat.jpg", cam=True).cam   # where it looked: 7x7 class activation map of the top-1 class
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Sized

import numpy as np

from .base import cache, settings
from .engines.choice import DeviceChoice, Engine, EngineChoice, choose_engine, create_engine
from .images.postprocess import softmax
from .base.errors import ImageError, MixnetError, UsageError
from .images.inputs import InputItem, fetch_image_url, is_url
from .images.labels import imagenet_labels, read_label_file
from .base.manifest import ModelSpec, resolve_model
from .images.preprocess import ImageInput, load_photo_and_transform, require_opencv
from .weights.store import VerifiedWeights, custom_weights, ensure_weights

# Part of this module's API, as before; they live in results.py for the thin client, which imports no numpy.
from .results import DEFAULT_TOPK, ClassificationResult, Prediction, check_topk  # noqa: F401




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

    Class activation maps (``classify(..., cam=True)``) come from an engine whose forward pass also gives the final
    feature map (the same kind of engine, except Paddle Inference), made on first use; ``cam=True`` here makes it at once (an engine named in
    ``engine`` that cannot give the map is then a :class:`UsageError` now, not at the first image).

    ``bulk_batch_size``: say so when the first job will be a bulk one (:meth:`classify_many` of more than
    :data:`BULK_AFTER_IMAGES` images, in batches of this size): OpenVINO then loads its throughput mode's model
    for it in the background instead of its one-image model (loaded on first use, if ever), so the first batch
    starts sooner; the other engines load as without it. Any job still runs; only what is loaded first changes.
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
        cam: bool = False,
        bulk_batch_size: int | None = None,
    ) -> None:
        named = resolve_model(model) if model is not None else None
        # OpenCV decodes and resizes every image: one that cannot load (opencv-python without the system's
        # libGL.so.1) is named by this constructor, with its fix, never blamed on each image. Before a download;
        # with the weights at hand, once the engine is made: OpenVINO then loads its compiled model in a thread
        # (engines/openvino.py) while OpenCV loads.
        opencv_after_engine = weights is not None or cache.weights_path(named or resolve_model("MixNet_S")).is_file()
        if not opencv_after_engine:
            require_opencv()
        if threads is None:
            threads = settings.cpu_threads()
        # Engine and device first: a missing GPU or engine is reported before any download.
        choice = choose_engine(engine, device, precision, compile, model=named.name if named else None,
                               threads=threads)
        if bulk_batch_size is not None:
            if bulk_batch_size < 1:
                raise UsageError(f"batch size must be at least 1, got {bulk_batch_size}")
            choice = dataclasses.replace(choice, bulk_batch=bulk_batch_size)
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
        self.features = features
        self._threads = threads
        self._cam_engine: Engine | None = None
        self._cam_columns: tuple[np.ndarray, np.ndarray] | None = None
        self._cam_lock = threading.Lock()
        if cam:  # first: an engine that cannot give the maps is refused before any conversion
            self._make_cam_engine(choice)
        self.engine: Engine
        self.engine_choice: EngineChoice
        self.engine, self.engine_choice = create_engine(self.spec, self.weights, choice, threads=threads,
                                                        features=features)
        self.device_choice: DeviceChoice = self.engine_choice.device_choice
        if opencv_after_engine:
            require_opencv()

    def cam_engine(self) -> Engine:
        """The engine whose forward pass gives the logits and the final feature map (``run_with_feature_map``),
        made once: this classifier's engine on the graph (or network) with that output, when it can give it (ONNX
        Runtime, OpenVINO, torch, dygraph), else ONNX Runtime on the CPU. Raises :class:`UsageError` when the engine the user named cannot give the map."""
        return self._make_cam_engine(self.engine_choice)

    def _make_cam_engine(self, choice: EngineChoice) -> Engine:
        with self._cam_lock:
            if self._cam_engine is None:
                from .network.architecture import architecture_for
                from .weights.pdparams import read_state_dict

                engine, _ = create_engine(self.spec, self.weights, choice, threads=self._threads, feature_map=True)
                architecture = architecture_for(self.spec)
                state = read_state_dict(self.weights.path)
                self._cam_columns = (np.asarray(state[architecture.classifier_weight], dtype=np.float32),
                                     np.asarray(state[architecture.classifier_bias], dtype=np.float32))
                self._cam_engine = engine
            return self._cam_engine

    @property
    def classifier_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The classifier's weight (float32 ``1536 x classes``, PaddleClas's ``[in, out]`` layout) and bias
        (float32 ``classes``), as the weights file holds them; read with the class activation maps' engine."""
        self.cam_engine()
        assert self._cam_columns is not None
        return self._cam_columns

    def _check_cam_class(self, cam_class: int | None) -> None:
        if cam_class is not None and not 0 <= cam_class < self.spec.num_classes:
            raise UsageError(f"class {cam_class} for the activation map: {self.spec.name} has classes 0 to "
                             f"{self.spec.num_classes - 1}")

    def __repr__(self) -> str:
        return (f"Classifier(model={self.spec.display_name!r}, engine={self.engine.name!r}, "
                f"device={self.device_choice.device!r}, weights={str(self.weights.path)!r})")

    @property
    def model_name(self) -> str:
        """What results call the model: ``MixNet_S``, or a fine-tune's name from its file (``my_flowers-3fa2c1d``)."""
        return self.spec.display_name

    @property
    def architecture(self) -> str:
        """The network: ``MixNet_S``, ``MixNet_M`` or ``MixNet_L``, fine-tuned or not."""
        return self.spec.name

    def preprocess(self, image: ImageInput | InputItem, name: str | None = None) -> np.ndarray:
        """One image as the network's 3xSxS float32 input (PaddleClas's evaluation transform).

        ``image`` is what the command line takes, resolved the same way: a path (``str`` or ``Path``), an
        http(s) URL (downloaded with ``MIXNET_TIMEOUT``, ``MIXNET_RETRIES`` and ``MIXNET_URL_DEADLINE``), an
        :class:`~mixnet_cli.images.inputs.InputItem`; or encoded bytes, a PIL image, an HxWx3 RGB (HxW grey, HxWx4 RGBA)
        uint8 array. Raises :class:`~mixnet_cli.base.errors.ImageError` for anything wrong with it."""
        return self._photo_and_input(image, name)[1]

    def _photo_and_input(self, image: ImageInput | InputItem, name: str | None) -> tuple[np.ndarray, np.ndarray]:
        """The decoded photo (``H x W x 3`` uint8 RGB) and the network input made from it (:meth:`preprocess`)."""
        if isinstance(image, InputItem):
            image = image.load()
        elif is_url(image):
            image = fetch_image_url(image)  # type: ignore[arg-type]
        return load_photo_and_transform(image, self.spec.preprocessing, name)

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
        return ClassificationResult(input=name, model=self.spec.display_name, predictions=predictions,
                                    features=features, architecture=self.spec.name)

    def _results(self, engine: Engine, names: list[str], arrays: list[np.ndarray], topk: int,
                 photos: list[np.ndarray] | None = None, cam_class: int | None = None) -> list[ClassificationResult]:
        """The results of one batch; with ``photos`` (``engine`` is :meth:`cam_engine`), each with its class
        activation map: of ``cam_class``, or of its top-1 class."""
        batch = np.stack(arrays)
        if photos is not None:
            return self._cam_results(engine, names, batch, topk, photos, cam_class)
        if self.features:
            logits, features = engine.run_with_features(batch)  # type: ignore[attr-defined]
        else:
            logits, features = engine.run(batch), None
        return [self.result(name, row, topk, features=None if features is None else features[index])
                for index, (name, row) in enumerate(zip(names, softmax(logits)))]

    def _cam_results(self, engine: Engine, names: list[str], batch: np.ndarray, topk: int,
                     photos: list[np.ndarray], cam_class: int | None) -> list[ClassificationResult]:
        logits, feature_maps = engine.run_with_feature_map(batch)  # type: ignore[attr-defined]
        weight, _ = self.classifier_weights
        results = []
        for index, (name, probabilities) in enumerate(zip(names, softmax(logits))):
            base = self.result(name, probabilities, topk, features=feature_maps[index].mean(axis=(1, 2))
                               if self.features else None)
            chosen = int(np.argmax(logits[index])) if cam_class is None else cam_class
            # sum_k W[k, c] F[k, y, x], accumulated in float64 so that the map's mean plus the bias is the logit to
            # float32 precision whatever the order of the sum
            cam = np.tensordot(weight[:, chosen].astype(np.float64), feature_maps[index].astype(np.float64), axes=1)
            # replace(), not a new result: the map comes on top of everything result() says (the architecture too)
            results.append(dataclasses.replace(
                base, cam=cam.astype(np.float32), cam_class=chosen, cam_label=self.labels[chosen],
                photo=photos[index], preprocessing=self.spec.preprocessing))
        return results

    def engine_for(self, count: int, batch_size: int, *, cam: bool = False) -> Engine:
        """The engine a job of ``count`` images runs on: more than :data:`BULK_AFTER_IMAGES` take the engine's
        throughput mode (ONNX Runtime's one-thread sessions side by side, OpenVINO's streams; the paddle engines
        are the same in both). ``cam``: the class activation maps' engine (:meth:`cam_engine`) instead."""
        engine = self.cam_engine() if cam else self.engine
        return engine.throughput(batch_size) if count > BULK_AFTER_IMAGES else engine

    def classify(self, image: ImageInput | InputItem, *, topk: int | None = None, name: str | None = None,
                 cam: bool = False, cam_class: int | None = None) -> ClassificationResult:
        """Classify one image (any input :meth:`preprocess` takes, URLs included); an unreadable image raises its
        :class:`~mixnet_cli.base.errors.ImageError`. ``cam`` (or a ``cam_class``): also the class activation
        map of the top-1 class (or of ``cam_class``), computed in the same forward pass
        (:class:`ClassificationResult`); a class outside the model's raises :class:`UsageError`."""
        label = name or _input_name(image)
        topk = check_topk(topk, len(self.labels))
        self._check_cam_class(cam_class)
        if cam or cam_class is not None:
            photo, array = self._photo_and_input(image, label)
            return self._results(self.cam_engine(), [label], [array], topk, [photo], cam_class)[0]
        return self._results(self.engine, [label], [self.preprocess(image, label)], topk)[0]

    def classify_many(
        self,
        images: Iterable[ImageInput | tuple[str, ImageInput] | InputItem],
        *,
        topk: int | None = None,
        batch_size: int = 4,
        workers: int = 2,
        cam: bool = False,
        cam_class: int | None = None,
    ) -> Iterator[ClassificationResult]:
        """Classify images in input order, in batches, decoding ahead in threads while the engine runs.

        Items are images, ``(name, image)`` pairs or :class:`~mixnet_cli.images.inputs.InputItem`. A bad image yields a
        result with ``error`` set and the rest go on; results are yielded in input order as soon as their batch
        is done. The engine's throughput mode (:meth:`~mixnet_cli.engines.choice.Engine.throughput`) runs jobs of more
        than :data:`BULK_AFTER_IMAGES` images (from the start when ``images`` has a length, else from there on),
        with as many batches in flight as it runs at once. ``cam``, ``cam_class``: each result also carries its class
        activation map and its decoded photo, as with :meth:`classify` (the photos of the batches in flight are
        held in memory).
        """
        topk = check_topk(topk, len(self.labels))
        self._check_cam_class(cam_class)
        cam = cam or cam_class is not None
        first = self.cam_engine() if cam else self.engine
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        if workers < 1:
            raise UsageError(f"decode workers must be at least 1, got {workers}")

        def prepare(item: ImageInput | tuple[str, ImageInput] | InputItem
                    ) -> tuple[str, tuple[np.ndarray | None, np.ndarray] | MixnetError]:
            image: ImageInput | InputItem = item  # type: ignore[assignment]
            if isinstance(item, InputItem):
                name = item.name
            else:
                name, image = item if isinstance(item, tuple) else (_input_name(item), item)
            try:
                # A URL is fetched here, in a decode thread, while the engine runs.
                photo, array = self._photo_and_input(item if isinstance(item, InputItem) else image, name)
                return name, (photo if cam else None, array)  # a photo nobody draws is not kept
            except MixnetError as exc:
                return name, exc
            except Exception as exc:  # noqa: BLE001 - whatever one input raises is that input's error, never the run's
                text = (str(exc).strip().splitlines() or [""])[0][:200]
                return name, ImageError(f"{name}: cannot read ({type(exc).__name__}: {text}); check the input")

        # In input order: a batch being classified, or the result of an image that failed to decode.
        outputs: deque[Future[list[ClassificationResult]] | ClassificationResult] = deque()
        batches_in_flight = 0
        submitted = 0
        decoders = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mixnet-decode")
        # The engine is driven from its own threads, so that this one keeps the decoders fed meanwhile.
        # One more than the engine can run at once (OpenVINO makes at most one stream per thread).
        runners = ThreadPoolExecutor(max_workers=(first.threads or 1) + 1, thread_name_prefix="mixnet-infer")
        try:
            decoding: deque[Future[tuple[str, tuple[np.ndarray | None, np.ndarray] | MixnetError]]] = deque()
            iterator = iter(images)
            exhausted = False

            def decode_ahead(count: int) -> None:
                nonlocal exhausted
                while not exhausted and len(decoding) < count:
                    try:
                        decoding.append(decoders.submit(prepare, next(iterator)))
                    except StopIteration:
                        exhausted = True

            # The decoders start before the bulk engine is asked for: it may still be loading (OpenVINO loads
            # its compiled model in the background, a tenth of a second or more), and they use that time.
            decode_ahead(batch_size * ((first.threads or 1) + 2) + workers)
            # A job known to be large starts in bulk mode; others switch once they prove large.
            engine = self.engine_for(len(images), batch_size, cam=cam) if isinstance(images, Sized) else first
            bulk = engine is not first
            names: list[str] = []
            arrays: list[np.ndarray] = []
            photos: list[np.ndarray] = []  # with cam only: the decoded photos, for drawing the maps

            def submit_batch() -> None:
                nonlocal names, arrays, photos, batches_in_flight, submitted, engine, bulk
                if not bulk and submitted >= BULK_AFTER_IMAGES:  # an input without a length has proved large
                    engine, bulk = self.engine_for(submitted + 1, batch_size, cam=cam), True
                outputs.append(runners.submit(self._results, engine, names, arrays, topk,
                                              photos if cam else None, cam_class))
                batches_in_flight += 1
                submitted += len(names)
                names, arrays, photos = [], [], []

            while True:
                # Enough decodes ahead to fill every batch in flight and the next, never the whole input.
                decode_ahead(batch_size * (engine.parallel + 2) + workers)
                if decoding:
                    name, prepared = decoding.popleft().result()
                    if isinstance(prepared, MixnetError):
                        if arrays:  # keep input order: what came before the failed image goes first
                            submit_batch()
                        outputs.append(ClassificationResult(input=name, model=self.spec.display_name, error=prepared,
                                                             architecture=self.spec.name))
                    else:
                        names.append(name)
                        arrays.append(prepared[1])
                        if prepared[0] is not None:
                            photos.append(prepared[0])
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
