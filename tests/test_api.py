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


def test_public_names():
    assert mixnet_cli.__version__
    for name in mixnet_cli.__all__:
        assert getattr(mixnet_cli, name) is not None
