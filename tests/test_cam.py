"""Class activation maps: exact for MixNet (the map's mean plus the bias is the logit, for every engine that gives
the map), placed where the object is (a square a fitted classifier responds to), drawn over the photo through the
preprocessing's own resize and crop (checked against cv2's resize on photos of both orientations), and written by
``mixnet classify --cam`` under names that never overwrite an input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imagegen import scene
from weightgen import (
    FINE_TUNED_CLASSES,
    make_fine_tuned_weights,
    make_square_weights,
    random_square,
    square_photo,
)
from mixnet_cli import Classifier
from mixnet_cli.base.errors import UsageError
from mixnet_cli.base.manifest import resolve_model
from mixnet_cli.cli import main
from mixnet_cli.engines import ENGINES
from mixnet_cli.images.heatmap import DIM_OUTSIDE, map_at_photo_size, overlay
from mixnet_cli.images.preprocess import crop_region, transform

PRE = resolve_model("MixNet_S").preprocessing
needs_torch = pytest.mark.skipif(ENGINES["torch"].missing() is not None, reason="needs torch (the [torch] extra)")
needs_openvino = pytest.mark.skipif(ENGINES["openvino"].missing() is not None, reason="needs openvino")
# Within a few float32 roundings of the size of the terms summed (sum_k |W[k, c] F_k| + |b_c|).
FLOAT32_ROUNDINGS = 4 * float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("cam-photos")
    rng = np.random.default_rng(27)
    paths = []
    for index, (width, height) in enumerate([(320, 240), (240, 330)]):
        path = directory / f"photo{index}.png"
        Image.fromarray(scene(rng, width, height)).save(path)
        paths.append(path)
    return paths


def assert_maps_are_exact(classifier: Classifier, photos: list[Path]) -> None:
    """For each photo: the map of the top-1 class (and of a class chosen) has its mean plus the bias equal to the
    logit of the same pass, to float precision, and so does the map of every class; the logits are the plain
    engine's."""
    weight, bias = (array.astype(np.float64) for array in classifier.classifier_weights)
    assert weight.shape == (1536, classifier.spec.num_classes) and bias.shape == (classifier.spec.num_classes,)
    for photo in photos:
        result = classifier.classify(photo, cam=True)
        assert result.cam is not None and result.cam.shape == (7, 7) and result.cam.dtype == np.float32
        assert result.cam_class == result.predictions[0].class_id
        batch = classifier.preprocess(photo)[None]
        logits, feature_map = classifier.cam_engine().run_with_feature_map(batch)
        assert feature_map.shape == (1, 1536, 7, 7) and feature_map.dtype == np.float32
        logits = logits[0].astype(np.float64)
        terms = np.abs(weight).T @ np.abs(feature_map[0].astype(np.float64)).mean(axis=(1, 2)) + np.abs(bias)
        every_class = np.einsum("kc,kyx->cyx", weight, feature_map[0].astype(np.float64))
        assert np.all(np.abs(every_class.mean(axis=(1, 2)) + bias - logits) <= FLOAT32_ROUNDINGS * terms)
        top = result.cam_class
        assert abs(float(result.cam.mean()) + bias[top] - logits[top]) <= FLOAT32_ROUNDINGS * terms[top]
        # The extra output costs the logits nothing: the plain engine's, within the engines' own tolerance.
        plain = classifier.engine.run(batch)[0].astype(np.float64)
        assert np.abs(plain - logits).max() <= 1e-4 * max(1.0, np.abs(plain).max())
        other = int(np.argsort(-logits)[-1])  # the least likely class: a map of its own
        chosen = classifier.classify(photo, cam_class=other)
        assert chosen.cam_class == other and chosen.predictions == result.predictions
        assert abs(float(chosen.cam.mean()) + bias[other] - logits[other]) <= FLOAT32_ROUNDINGS * terms[other]
        assert not np.allclose(chosen.cam, result.cam)


# Every engine that gives the feature map: mixnet's graph (ONNX Runtime, OpenVINO), its torch network, and
# paddleclas's own network (dygraph). Paddle Inference runs a saved program that ends in the logits.
ENGINES_WITH_MAPS = ["onnxruntime", pytest.param("openvino", marks=needs_openvino),
                     pytest.param("torch", marks=needs_torch), pytest.param("dygraph", marks=pytest.mark.paddle)]
MODELS = ["MixNet_S", pytest.param("MixNet_M", marks=pytest.mark.slow),
          pytest.param("MixNet_L", marks=pytest.mark.slow)]


@pytest.mark.parametrize("engine", ENGINES_WITH_MAPS)
@pytest.mark.parametrize("model_name", MODELS)
def test_map_mean_plus_bias_is_the_logit(model_name, engine, calibrated_weights, photos):
    classifier = Classifier(model_name, weights=calibrated_weights(model_name), engine=engine, cam=True)
    assert classifier.cam_engine().name == engine
    assert_maps_are_exact(classifier, photos)


@pytest.mark.parametrize("engine", ENGINES_WITH_MAPS)
def test_fine_tuned_maps_have_its_classes(engine, calibrated_weights, photos, tmp_path):
    weights = make_fine_tuned_weights(calibrated_weights("MixNet_S"), tmp_path / "flowers.pdparams")
    classifier = Classifier(weights=weights, engine=engine)
    assert_maps_are_exact(classifier, photos)
    result = classifier.classify(photos[0], cam_class=len(FINE_TUNED_CLASSES) - 1)
    assert result.cam_label == str(len(FINE_TUNED_CLASSES) - 1)  # no label file: named by id
    with pytest.raises(UsageError, match="classes 0 to 6"):
        classifier.classify(photos[0], cam_class=len(FINE_TUNED_CLASSES))


@pytest.mark.paddle
def test_engines_without_maps_say_so_in_one_line(calibrated_weights):
    with pytest.raises(UsageError) as refused:
        Classifier(weights=calibrated_weights("MixNet_S"), engine="paddle", cam=True)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("--engine paddle gives no class activation maps")
    assert "use --engine onnxruntime, openvino" in message


# -- where the map lies ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def square_weights(calibrated_weights, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The calibrated MixNet_S with a 2-class classifier (0: flat background, 1: a red square on it), fitted on
    the pooled features of generated photos of each (weightgen.make_square_weights)."""
    return make_square_weights(calibrated_weights("MixNet_S"),
                               tmp_path_factory.mktemp("square-weights") / "square.pdparams")


def test_the_map_peaks_inside_the_square(square_weights):
    classifier = Classifier(weights=square_weights)
    rng = np.random.default_rng(11)
    for width, height in [(400, 300), (300, 400), (400, 300), (300, 400), (360, 360), (500, 280)]:
        # Between the outer cells' centres (crop pixels 32 to 192): the map has no cell of its own beyond them.
        box = random_square(rng, width, height, 56, reach_in_crop=80)
        result = classifier.classify(square_photo(width, height, box), cam=True)
        assert result.predictions[0].class_id == 1, "the fitted classifier sees the square"
        placed = result.cam_at_photo_size()
        assert placed.shape == (height, width) and placed.dtype == np.float32
        y, x = np.unravel_index(np.nanargmax(placed), placed.shape)
        left, top, right, bottom = box
        assert left <= x < right and top <= y < bottom, f"maximum at {(x, y)}, square {box} in {width}x{height}"
    plain = classifier.classify(square_photo(400, 300, None), cam=True)
    assert plain.predictions[0].class_id == 0


# -- the geometry, held to cv2's resize and crop ---------------------------------------------------------------

def _blob(width: int, height: int, x: float, y: float, sigma: float = 4.0) -> np.ndarray:
    columns, rows = np.meshgrid(np.arange(width), np.arange(height))
    value = 255 * np.exp(-((columns - x) ** 2 + (rows - y) ** 2) / (2 * sigma ** 2))
    return np.repeat(np.rint(value).astype(np.uint8)[..., None], 3, axis=2)


def _bilinear(image: np.ndarray, x: float, y: float) -> float:
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    fx, fy = x - x0, y - y0
    patch = image[y0:y0 + 2, x0:x0 + 2].astype(np.float64)
    return float(patch[0, 0] * (1 - fx) * (1 - fy) + patch[0, 1] * fx * (1 - fy) + patch[1, 0] * (1 - fx) * fy
                 + patch[1, 1] * fx * fy)


@pytest.mark.parametrize("width, height", [(333, 500), (517, 301)], ids=["portrait", "landscape"])
def test_placement_follows_the_preprocessing(width, height):
    """A blob in the photo, found in the network's crop (the real cv2 resize and crop), is where the placement
    says that crop position lies: the map's own coordinates, read back through a linear ramp (which the cubic
    interpolation reproduces exactly), and the crop region the page draws with."""
    cells = np.arange(7, dtype=np.float64)
    across = map_at_photo_size(np.tile(cells, (7, 1)), width, height, PRE)  # crop column / 32 at each pixel
    down = map_at_photo_size(np.tile(cells[:, None], (1, 7)), width, height, PRE)
    left, top, right, bottom = crop_region(width, height, PRE)
    rng = np.random.default_rng(3)
    for _ in range(4):
        # Blob centres well inside the crop, where the ramp is not clamped (crop pixels 40 to 180).
        u_goal, v_goal = rng.uniform(40, 180, size=2)
        x = left + (u_goal + 0.5) * (right - left) / PRE.crop_size - 0.5
        y = top + (v_goal + 0.5) * (bottom - top) / PRE.crop_size - 0.5
        crop = transform(_blob(width, height, x, y), PRE)[0] * PRE.std[0] + PRE.mean[0]
        weights = np.clip(crop - crop.min(), 0, None)
        rows, columns = np.indices(crop.shape)
        u, v = (weights * columns).sum() / weights.sum(), (weights * rows).sum() / weights.sum()
        assert abs(u - u_goal) < 0.3 and abs(v - v_goal) < 0.3, "crop_region matches cv2's resize and crop"
        assert abs(32 * _bilinear(across, x, y) - u) < 0.3 and abs(32 * _bilinear(down, x, y) - v) < 0.3
    # The map covers exactly the pixels whose centres lie in the crop; the rest is NaN, and dimmed in the picture.
    columns = np.arange(width) + 0.5
    rows = np.arange(height) + 0.5
    inside = ((rows >= top) & (rows < bottom))[:, None] & ((columns >= left) & (columns < right))[None, :]
    assert np.array_equal(~np.isnan(across), inside)
    photo = np.full((height, width, 3), 200, dtype=np.uint8)
    picture = overlay(photo, np.random.default_rng(0).normal(size=(7, 7)), PRE)
    assert picture.shape == photo.shape and picture.dtype == np.uint8
    assert np.all(picture[~inside] == round(200 * DIM_OUTSIDE))
    assert np.all(np.any(picture[inside] != round(200 * DIM_OUTSIDE), axis=-1))


def test_large_photos_are_drawn_shrunk():
    picture = overlay(np.zeros((1000, 4000, 3), dtype=np.uint8), np.eye(7), PRE)
    assert picture.shape == (400, 1600, 3)


# -- mixnet classify --cam -------------------------------------------------------------------------------------

def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_classify_writes_one_picture_per_image(tmp_path, calibrated_weights):
    weights = calibrated_weights("MixNet_S")
    rng = np.random.default_rng(8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cams = tmp_path / "cams"
    cams.mkdir()
    inputs = {"a/cat.png": (320, 240), "b/cat.png": (240, 320), "p.jpg": (300, 200), "cams/p.cam.png": (200, 300)}
    for name, (width, height) in inputs.items():
        Image.fromarray(scene(rng, width, height)).save(tmp_path / name)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    before = (cams / "p.cam.png").read_bytes()
    arguments = [str(tmp_path / name) for name in ["a/cat.png", "b/cat.png", "broken.jpg", "p.jpg", "cams/p.cam.png"]]
    result = CliRunner().invoke(main, ["classify", *arguments, "--weights", str(weights), "--cam", str(cams),
                                       "--json"])
    assert result.exit_code == 1, result.output  # the broken one
    rows = json.loads(result.stdout)
    files = [row.get("cam", {}).get("file") for row in rows]
    assert files == [str(cams / "cat.cam.png"), str(cams / "cat-2.cam.png"), None, str(cams / "p-2.cam.png"),
                     str(cams / "p.cam.cam.png")]
    assert "error" in rows[2] and "cam" not in rows[2]
    assert (cams / "p.cam.png").read_bytes() == before, "an input is never overwritten"
    assert sorted(path.name for path in cams.iterdir()) == ["cat-2.cam.png", "cat.cam.png", "p-2.cam.png",
                                                            "p.cam.cam.png", "p.cam.png"]
    classifier = Classifier(weights=weights)
    for row, argument in zip(rows, arguments):
        if "error" in row:
            continue
        api = classifier.classify(argument, cam=True)
        assert row["cam"]["class_id"] == api.cam_class == row["predictions"][0]["class_id"]
        assert np.allclose(np.asarray(row["cam"]["grid"]), api.cam, rtol=1e-5, atol=1e-5)
        written = _png(Path(row["cam"]["file"]))
        assert written.shape == api.photo.shape
        assert np.array_equal(written, api.cam_overlay())


def test_cam_class_and_usage_errors(tmp_path, calibrated_weights, photos):
    weights = str(calibrated_weights("MixNet_S"))
    chosen = CliRunner().invoke(main, ["classify", str(photos[0]), "--weights", weights, "--cam", str(tmp_path / "c"),
                                       "--cam-class", "281", "--json"])
    assert chosen.exit_code == 0, chosen.output
    row = json.loads(chosen.stdout)[0]
    assert row["cam"]["class_id"] == 281 and row["cam"]["label"] == "tabby, tabby cat"
    assert (tmp_path / "c" / "photo0.cam.png").is_file()
    table = CliRunner().invoke(main, ["classify", str(photos[0]), "--weights", weights, "--cam", str(tmp_path / "t")])
    assert f"map of class {row['predictions'][0]['class_id']}" in table.stdout
    assert str(tmp_path / "t" / "photo0.cam.png") in table.stdout
    alone = CliRunner().invoke(main, ["classify", str(photos[0]), "--cam-class", "3"])
    assert alone.exit_code == 2 and "--cam DIR" in alone.stderr
    outside = CliRunner().invoke(main, ["classify", str(photos[0]), "--weights", weights, "--cam",
                                        str(tmp_path / "never"), "--cam-class", "1000"])
    assert outside.exit_code == 2 and "classes 0 to 999" in outside.stderr
    assert not (tmp_path / "never").exists()  # refused before any picture: no folder left behind
    remote = CliRunner().invoke(main, ["classify", str(photos[0]), "--server", "http://127.0.0.1:9", "--cam",
                                       str(tmp_path / "r")])
    assert remote.exit_code == 2 and "?cam=1" in remote.stderr
    a_file = tmp_path / "not-a-directory"
    a_file.write_text("x")
    blocked = CliRunner().invoke(main, ["classify", str(photos[0]), "--weights", weights, "--cam", str(a_file)])
    assert blocked.exit_code == 2 and "not-a-directory" in blocked.stderr and a_file.read_text() == "x"
    # nothing can be made there: found before the weights (none cached, offline), as -o is
    unwritable = CliRunner().invoke(main, ["classify", str(photos[0]), "--offline", "--cam", "/proc/cams"])
    assert unwritable.exit_code == 2, unwritable.output
    assert unwritable.stderr.startswith("Error: --cam /proc/cams: /proc is not writable")
    if ENGINES["paddle"].missing() is None:
        refused = CliRunner().invoke(main, ["classify", str(photos[0]), "--weights", weights, "--engine", "paddle",
                                            "--cam", str(tmp_path / "o")])
        assert refused.exit_code == 2
        assert refused.stderr.count("\n") == 1 and "gives no class activation maps" in refused.stderr
        assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.paddle
@pytest.mark.parametrize("engine", ENGINES_WITH_MAPS)
def test_feature_map_is_paddleclas_final_block(engine, calibrated_weights, photos):
    """The map's input is paddleclas's own: the output of its network's ``final_block`` (the last 1x1 convolution,
    batch norm and ReLU), before ``final_pool``."""
    import paddle
    from paddleclas.ppcls.arch.backbone.model_zoo import mixnet
    from paddleclas_reference import paddleclas_decode, paddleclas_transform

    weights = calibrated_weights("MixNet_S")
    network = mixnet.MixNet_S(pretrained=False, class_num=1000)
    network.set_state_dict(paddle.load(str(weights)))
    network.eval()
    batch = np.stack([paddleclas_transform(paddleclas_decode(path)) for path in photos])
    with paddle.no_grad():
        x = paddle.to_tensor(batch)
        for name, layer in network.features.named_children():
            if name == "final_pool":
                break
            x = layer(x)
    want = x.numpy()
    classifier = Classifier(weights=weights, engine=engine, cam=True)
    _, got = classifier.cam_engine().run_with_feature_map(batch)
    assert got.shape == want.shape == (len(photos), 1536, 7, 7)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
