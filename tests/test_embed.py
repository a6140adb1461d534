"""``--embed``: each image's pooled features (what the classifier reads), in JSON and as one .npy file; they are
the classifier's input, so ``softmax(features @ W + b)`` must give the printed scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imagegen import scene
from mixnet_cli.cli import main
from mixnet_cli.weights.pdparams import read_state_dict
from mixnet_cli.images.postprocess import softmax


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(31)
    paths = []
    for index in range(3):
        path = tmp_path / f"photo{index}.png"
        Image.fromarray(scene(rng, 200, 150)).save(path)
        paths.append(path)
    return paths


def test_features_are_what_the_classifier_reads(photos, tmp_path, calibrated_mirror, calibrated_weights):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    inputs = [str(photos[0]), str(broken), str(photos[1]), str(photos[2])]
    npy = tmp_path / "features.npy"
    result = CliRunner().invoke(main, ["classify", *inputs, "--jsonl", "--embed", "--embed-npy", str(npy), "-k", "1000"])
    assert result.exit_code == 1, result.output  # the broken one
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    state = read_state_dict(calibrated_weights("MixNet_S"))
    weight, bias = state["output.weight"].astype(np.float64), state["output.bias"].astype(np.float64)
    table = np.load(npy)
    assert table.shape == (4, 1536) and table.dtype == np.float32
    assert np.isnan(table[1]).all() and "features" not in rows[1]
    for index in (0, 2, 3):
        features = np.asarray(rows[index]["features"], dtype=np.float64)
        assert features.shape == (1536,) and np.array_equal(features.astype(np.float32), table[index])
        probabilities = softmax((features @ weight + bias)[None])[0]
        scores = {p["class_id"]: p["score"] for p in rows[index]["predictions"]}
        assert max(abs(probabilities[c] - s) for c, s in scores.items()) < 1e-5
    assert not np.allclose(table[0], table[2]), "different pictures, different features"
    # Without --embed the JSON carries no features; with a table it is a usage error.
    plain = CliRunner().invoke(main, ["classify", inputs[0], "--json"])
    assert "features" not in json.loads(plain.stdout)[0]
    table_embed = CliRunner().invoke(main, ["classify", inputs[0], "--embed"])
    assert table_embed.exit_code == 2 and "--json" in table_embed.stderr


@pytest.mark.paddle
def test_features_equal_paddleclas_pooled_features(photos, calibrated_mirror, calibrated_weights):
    import paddle
    from paddleclas.ppcls.arch.backbone.model_zoo import mixnet
    from paddleclas_reference import paddleclas_decode, paddleclas_transform

    from mixnet_cli import Classifier

    network = mixnet.MixNet_S(pretrained=False, class_num=1000)
    network.set_state_dict(paddle.load(str(calibrated_weights("MixNet_S"))))
    network.eval()
    batch = np.stack([paddleclas_transform(paddleclas_decode(p)) for p in photos])
    with paddle.no_grad():
        want = network.features(paddle.to_tensor(batch)).numpy().reshape(len(photos), -1)
    classifier = Classifier(features=True)
    got = np.stack([r.features for r in classifier.classify_many(photos)])
    assert got.shape == want.shape == (len(photos), 1536)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
