"""The Python API: load once, classify paths, bytes, PIL images and numpy arrays alike."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import mixnet_cli
from mixnet_cli import Classifier, ImageError


@pytest.fixture
def classifier(random_mirror):
    return Classifier("S", device="cpu")


def _image() -> Image.Image:
    image = Image.linear_gradient("L").resize((300, 220)).convert("RGB")
    image.paste((30, 160, 220), (40, 40, 150, 120))
    return image


def test_every_input_kind_gives_the_same_answer(classifier, tmp_path):
    image = _image()
    path = tmp_path / "a.png"
    image.save(path)
    from_path = classifier.classify(path)
    for other in (path.read_bytes(), image, np.asarray(image), str(path)):
        result = classifier.classify(other)
        assert [p.class_id for p in result.predictions] == [p.class_id for p in from_path.predictions]
        assert [p.score for p in result.predictions] == pytest.approx([p.score for p in from_path.predictions], abs=1e-9)
    assert from_path.to_dict()["input"] == str(path)
    assert classifier.classify(image).input == "<Image>"


def test_classify_raises_and_classify_many_goes_on(classifier, tmp_path):
    with pytest.raises(FileNotFoundError):
        classifier.classify(tmp_path / "missing.png")
    with pytest.raises(ImageError):
        classifier.classify(b"not an image")
    good = tmp_path / "good.png"
    _image().save(good)
    results = list(classifier.classify_many([good, tmp_path / "missing.png", ("named", _image())], topk=2, batch_size=2))
    assert [r.ok for r in results] == [True, False, True]
    assert results[2].input == "named" and len(results[2].predictions) == 2
    assert results[1].to_dict()["error"]["type"] == "ImageNotFoundError"


def test_batches_give_the_same_answers_as_single_images(classifier, tmp_path):
    images = []
    for i in range(5):
        image = _image().rotate(i * 30)
        images.append(image)
    singles = [classifier.classify(image) for image in images]
    batched = list(classifier.classify_many(images, batch_size=4))
    for one, many in zip(singles, batched):
        assert [p.class_id for p in one.predictions] == [p.class_id for p in many.predictions]
        assert [p.score for p in one.predictions] == pytest.approx([p.score for p in many.predictions], abs=1e-6)


def test_bulk_jobs_keep_input_order_and_answers_through_the_switch(classifier, tmp_path, monkeypatch):
    import threading

    import mixnet_cli.classifier

    # A small threshold, so the switch to the engine's throughput mode happens within a few images.
    monkeypatch.setattr(mixnet_cli.classifier, "BULK_AFTER_IMAGES", 4)
    switched = []
    latency_mode = classifier.engine.throughput
    monkeypatch.setattr(classifier.engine, "throughput", lambda size: switched.append(size) or latency_mode(size))
    images: list = []
    for i in range(23):
        images.append((f"image{i}", _image().rotate(i * 15)) if i % 7 else (f"bad{i}", b"not an image"))
    results = list(classifier.classify_many(iter(images), batch_size=4, workers=3))
    assert [r.input for r in results] == [name for name, _ in images]
    for (name, image), result in zip(images, results):
        if name.startswith("bad"):
            assert result.error is not None and not result.predictions
            continue
        single = classifier.classify(image, name=name)
        assert [p.class_id for p in result.predictions] == [p.class_id for p in single.predictions]
        assert [p.score for p in result.predictions] == pytest.approx([p.score for p in single.predictions], abs=1e-6)
    assert switched == [4]  # once, for an input without a length: after the first images
    list(classifier.classify_many(images[:4], batch_size=2))
    assert switched == [4]  # a small job stays in latency mode
    list(classifier.classify_many(images, batch_size=2))
    assert switched == [4, 2]  # a large list starts in bulk mode
    # A consumer that stops early leaves no thread behind.
    stream = classifier.classify_many(images, batch_size=2)
    assert next(stream).input == "bad0"
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith(("mixnet-decode", "mixnet-infer"))]


def test_public_names():
    assert mixnet_cli.__version__
    for name in mixnet_cli.__all__:
        assert getattr(mixnet_cli, name) is not None


def test_the_library_logs_its_notices_and_prints_nothing(random_mirror, caplog, capsys, monkeypatch):
    """Library code logs (``mixnet_cli.*`` loggers); only the CLI decides what reaches stderr."""
    import logging

    # As in a program that never ran the CLI (which gives the logger its own handler, alone: no propagation).
    monkeypatch.setattr(logging.getLogger("mixnet_cli"), "handlers", [])
    monkeypatch.setattr(logging.getLogger("mixnet_cli"), "propagate", True)

    with caplog.at_level(logging.INFO, logger="mixnet_cli"):
        Classifier("S", device="cpu", progress=False)
    messages = [(record.name, record.getMessage()) for record in caplog.records]
    assert ("mixnet_cli.engines.conversion", "converting MixNet_S to ONNX (once)...") in messages
    assert capsys.readouterr() == ("", "")
