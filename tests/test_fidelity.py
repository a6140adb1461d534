"""mixnet gives PaddleClas's answers: for every kind of image file, the top-5 class ids (in order) and their
probabilities equal those of PaddleClas's own pipeline, computed here independently with its deploy
preprocessing operators (cv2 decoding) and its dygraph network with the same weights.

The weights are the calibrated test weights: confident and different per picture, so a preprocessing that is
off by a grey level here and there changes probabilities by far more than the tolerance (checked below too).
"""

from __future__ import annotations

import json
import pickletools
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mixnet_cli import Classifier
from mixnet_cli.cli import main
from mixnet_cli.base.manifest import resolve_model
from mixnet_cli.images.preprocess import load_and_transform

from paddleclas_reference import (  # noqa: E402  (a helper module beside the tests)
    CROP_SIZE,
    TOLERANCE,
    TOPK,
    PaddleClasReference,
    paddleclas_decode,
    paddleclas_transform,
)


# Everything here compares with paddleclas itself.
pytestmark = pytest.mark.paddle


def assert_same_answer(
    ids: list[int], scores: list[float], reference_ids: list[int], reference: np.ndarray, what: str
) -> float:
    """Same top-k ids in the same order, each probability within TOLERANCE; returns the largest difference."""
    assert ids == reference_ids, f"{what}: top-{TOPK} {ids} but PaddleClas gives {reference_ids}"
    difference = max(abs(score - float(reference[i])) for i, score in zip(ids, scores))
    assert difference <= TOLERANCE, f"{what}: probabilities differ from PaddleClas's by {difference:.2e}"
    return difference


@pytest.fixture(scope="module")
def reference_s(calibrated_weights_dir: Path) -> PaddleClasReference:
    return PaddleClasReference("MixNet_S", calibrated_weights_dir / "MixNet_S_pretrained.pdparams")


@pytest.fixture(scope="module")
def reference_answers(
    reference_s: PaddleClasReference, test_images: dict[str, Path]
) -> dict[str, tuple[list[int], np.ndarray]]:
    return {kind: reference_s.answer(paddleclas_transform(paddleclas_decode(path))) for kind, path in test_images.items()}


@pytest.fixture(scope="module", params=["auto", "dygraph"])
def classifier_s(
    request: pytest.FixtureRequest, calibrated_server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Classifier]:
    """The Classifier users get (engine auto: ONNX Runtime on the CPU) and the paddle reference engine, each
    downloading the weights from the local mirror into a cache of its own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MIXNET_HOME", str(tmp_path_factory.mktemp(f"fidelity-home-{request.param}")))
        yield Classifier("MixNet_S", engine=request.param, mirrors=[calibrated_server.url], progress=False)


def test_every_image_kind_is_covered(test_images: dict[str, Path]) -> None:
    expected = {
        "rgb_jpeg", "grey_jpeg", "grey_png", "palette_png", "palette_transparent_png", "rgba_png", "la_png",
        "cmyk_jpeg", "grey16_png", "rgb16_png", "exif3_jpeg", "exif6_jpeg", "exif8_jpeg", "tiny_png",
        "wide_jpeg", "webp", "bmp", "tiff", "gif",
    }
    assert expected <= set(test_images)
    modes = {kind: Image.open(path).mode for kind, path in test_images.items()}
    assert modes["grey16_png"].startswith("I") and modes["palette_transparent_png"] == "P"
    assert modes["cmyk_jpeg"] == "CMYK" and modes["la_png"] == "LA" and modes["rgba_png"] == "RGBA"
    assert Image.open(test_images["exif6_jpeg"]).getexif()[0x0112] == 6


@pytest.mark.parametrize("kind", [
    "rgb_jpeg", "grey_jpeg", "grey_png", "palette_png", "palette_transparent_png", "rgba_png", "la_png",
    "cmyk_jpeg", "grey16_png", "rgb16_png", "exif3_jpeg", "exif6_jpeg", "exif8_jpeg", "tiny_png", "wide_jpeg",
    "webp", "bmp", "tiff", "gif",
])
def test_preprocessing_equals_paddleclas_exactly(kind: str, test_images: dict[str, Path]) -> None:
    path = test_images[kind]
    ours = load_and_transform(path, resolve_model("MixNet_S").preprocessing)
    theirs = paddleclas_transform(paddleclas_decode(path))
    assert ours.shape == theirs.shape == (3, CROP_SIZE, CROP_SIZE)
    assert ours.dtype == np.float32
    difference = float(np.abs(ours - theirs).max())
    assert np.array_equal(ours, theirs), f"{kind}: max abs difference {difference:.3g}"


@pytest.mark.parametrize("kind", [
    "rgb_jpeg", "grey_jpeg", "grey_png", "palette_png", "palette_transparent_png", "rgba_png", "la_png",
    "cmyk_jpeg", "grey16_png", "rgb16_png", "exif3_jpeg", "exif6_jpeg", "exif8_jpeg", "tiny_png", "wide_jpeg",
    "webp", "bmp", "tiff", "gif",
])
def test_classifier_gives_paddleclas_answers(
    kind: str, classifier_s: Classifier, test_images: dict[str, Path], reference_answers
) -> None:
    result = classifier_s.classify(test_images[kind], topk=TOPK)
    reference_ids, reference = reference_answers[kind]
    assert_same_answer(
        [p.class_id for p in result.predictions], [p.score for p in result.predictions], reference_ids, reference,
        f"{kind} ({classifier_s.engine.name})",
    )


def test_cli_json_gives_paddleclas_answers(
    calibrated_mirror, test_images: dict[str, Path], reference_answers
) -> None:
    paths = list(test_images.values())
    result = CliRunner().invoke(main, ["classify", *map(str, paths), "--json", "--topk", str(TOPK)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["input"] for row in rows] == [str(path) for path in paths]
    assert calibrated_mirror.requests == ["/MixNet_S_pretrained.pdparams"]
    for (kind, _), row in zip(test_images.items(), rows):
        reference_ids, reference = reference_answers[kind]
        assert_same_answer(
            [p["class_id"] for p in row["predictions"]], [p["score"] for p in row["predictions"]],
            reference_ids, reference, f"{kind} (CLI)",
        )


def test_older_pickle_protocol_weights_give_identical_answers(
    calibrated_weights_dir: Path, tmp_path: Path, file_server, test_images: dict[str, Path], reference_answers
) -> None:
    import paddle

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    old = mirror / "MixNet_S_pretrained.pdparams"
    paddle.save(paddle.load(str(calibrated_weights_dir / old.name)), str(old), protocol=2)
    opcodes = pickletools.genops(old.read_bytes())
    first = next(opcodes)
    assert (first[0].name, first[1]) == ("PROTO", 2)

    classifier = Classifier("MixNet_S", engine="dygraph", mirrors=[file_server(mirror).url], progress=False)
    reference_old = PaddleClasReference("MixNet_S", old)
    for kind in ("rgb_jpeg", "palette_png", "exif6_jpeg"):
        result = classifier.classify(test_images[kind], topk=TOPK)
        reference_ids, reference = reference_answers[kind]
        ids = [p.class_id for p in result.predictions]
        scores = [p.score for p in result.predictions]
        assert_same_answer(ids, scores, reference_ids, reference, f"{kind} (protocol 2 weights)")
        assert_same_answer(ids, scores, *reference_old.answer(paddleclas_transform(paddleclas_decode(test_images[kind]))),
                           f"{kind} (protocol 2 weights, PaddleClas)")


def test_calibrated_weights_are_discriminative(reference_answers) -> None:
    """Answers are confident and differ between pictures, so the fidelity tests compare something."""
    top1 = [reference[ids[0]] for ids, reference in reference_answers.values()]
    classes = {ids[0] for ids, _ in reference_answers.values()}
    assert float(np.median(top1)) > 0.3, f"median top-1 probability {np.median(top1):.3f}"
    assert len(classes) >= 3, f"only {len(classes)} distinct top-1 classes over {len(top1)} pictures"


def test_fidelity_tests_catch_a_pillow_resize(
    reference_s: PaddleClasReference, test_images: dict[str, Path], reference_answers
) -> None:
    """Pillow's bilinear resize differs from cv2's by a grey level here and there (it antialiases); with these
    weights that moves the answers by more than the tolerance on most pictures, so a pipeline that resized
    with Pillow would fail the tests above."""
    caught = []
    for kind, path in test_images.items():
        pillow_input = paddleclas_transform(paddleclas_decode(path), resize_backend="pil")
        ids, probabilities = reference_s.answer(pillow_input)
        try:
            assert_same_answer(ids, [float(probabilities[i]) for i in ids], *reference_answers[kind], kind)
        except AssertionError:
            caught.append(kind)
    assert len(caught) >= 0.75 * len(test_images), f"only caught on {caught}"


def test_fidelity_tests_catch_swapped_channels(classifier_s: Classifier, test_images: dict[str, Path],
                                               reference_answers) -> None:
    """Feeding BGR instead of RGB (cv2's order, the classic mistake) changes the answer on every colour picture."""
    for kind in ("rgb_jpeg", "webp", "exif8_jpeg"):
        bgr = classifier_s.preprocess(test_images[kind])[::-1].copy()
        logits = classifier_s.logits(bgr[None])[0].astype(np.float64)
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        ids = [int(i) for i in np.argsort(-probabilities)[:TOPK]]
        with pytest.raises(AssertionError):
            assert_same_answer(ids, [float(probabilities[i]) for i in ids], *reference_answers[kind], kind)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["MixNet_M", "MixNet_L"])
def test_bigger_models_give_paddleclas_answers(
    model_name: str, calibrated_weights, calibrated_mirror, test_images: dict[str, Path]
) -> None:
    reference = PaddleClasReference(model_name, calibrated_weights(model_name))
    classifier = Classifier(model_name, progress=False)
    for kind in ("rgb_jpeg", "cmyk_jpeg", "exif6_jpeg", "grey16_png"):
        result = classifier.classify(test_images[kind], topk=TOPK)
        reference_ids, probabilities = reference.answer(paddleclas_transform(paddleclas_decode(test_images[kind])))
        assert_same_answer([p.class_id for p in result.predictions], [p.score for p in result.predictions],
                           reference_ids, probabilities, f"{kind} ({model_name}, {classifier.engine.name})")
