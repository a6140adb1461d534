"""`mixnet eval` on a small labelled set whose accuracy the test knows from PaddleClas's own pipeline."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from imagegen import scenes
from mixnet_cli.cli import main
from mixnet_cli.images.labels import imagenet_synsets
from mixnet_cli.base.manifest import resolve_model
from mixnet_cli.base.third_party import paddle_missing

IMAGES = 12
TOP1_HITS = 5  # labelled with PaddleClas's top-1 class
TOP5_ONLY = 3  # labelled with PaddleClas's third class: wrong at top-1, right at top-5
# The remaining images are labelled with a class outside PaddleClas's top-5: wrong at both.


def _reference_top5(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """PaddleClas's own pipeline where the [paddle] extra is installed; else mixnet on ONNX Runtime (held to
    PaddleClas by the fidelity tests)."""
    weights = weights_dir / "MixNet_S_pretrained.pdparams"
    if paddle_missing() is None:
        from paddleclas_reference import PaddleClasReference, paddleclas_decode, paddleclas_transform

        reference = PaddleClasReference("MixNet_S", weights)
        return lambda path: reference.answer(paddleclas_transform(paddleclas_decode(path)))[0]
    from mixnet_cli import Classifier
    from mixnet_cli.weights.store import install_from_file

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MIXNET_HOME", str(tmp_path_factory.mktemp("reference-home")))
        install_from_file(resolve_model("MixNet_S"), weights)
        classifier = Classifier("MixNet_S", engine="onnxruntime", progress=False)
    return lambda path: [p.class_id for p in classifier.classify(path, topk=5).predictions]


@pytest.fixture(scope="module")
def labelled_set(calibrated_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An ImageFolder (synset sub-folders) and an equivalent PaddleClas list file, with known accuracy."""
    root = tmp_path_factory.mktemp("labelled")
    unsorted = tmp_path_factory.mktemp("unsorted")
    top5_of = _reference_top5(calibrated_weights_dir, tmp_path_factory)
    synsets = imagenet_synsets()
    lines = []
    labels = []
    for index, pixels in enumerate(scenes(IMAGES, 300, 240, seed=77)):
        staging = unsorted / f"img{index:02d}.png"
        Image.fromarray(pixels).save(staging)
        top5 = top5_of(staging)
        if index < TOP1_HITS:
            label = top5[0]
        elif index < TOP1_HITS + TOP5_ONLY:
            label = top5[2]
        else:
            label = next(c for c in range(1000) if c not in top5)
        labels.append(label)
        folder = root / "val" / synsets[label]
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / staging.name
        staging.rename(target)
        lines.append(f"val/{synsets[label]}/{target.name} {label}")
    (root / "val_list.txt").write_text("\n".join(lines) + "\n")
    return root, labels


def _eval(*args: str):
    return CliRunner().invoke(main, ["eval", *args], catch_exceptions=False)


def test_eval_reports_the_known_accuracy_for_both_layouts(labelled_set, calibrated_mirror):
    root, _ = labelled_set
    from_folder = _eval(str(root / "val"), "--json")
    assert from_folder.exit_code == 0, from_folder.output
    summary = json.loads(from_folder.stdout)
    assert summary["model"] == "MixNet_S" and summary["images"] == IMAGES and summary["failed"] == 0
    assert summary["top1"] == pytest.approx(100 * TOP1_HITS / IMAGES, abs=1e-4)  # percent, as PaddleClas publishes
    assert summary["top5"] == pytest.approx(100 * (TOP1_HITS + TOP5_ONLY) / IMAGES, abs=1e-4)
    assert summary["images_per_s"] > 0

    from_list = json.loads(_eval("--list", str(root / "val_list.txt"), "--json").stdout)
    assert (from_list["top1"], from_list["top5"]) == (summary["top1"], summary["top5"])

    table = _eval(str(root / "val")).stdout
    assert f"{TOP1_HITS / IMAGES * 100:.2f}" in table and f"{(TOP1_HITS + TOP5_ONLY) / IMAGES * 100:.2f}" in table
    rows = list(csv.DictReader(io.StringIO(_eval(str(root / "val"), "--csv").stdout)))
    assert [(r["model"], r["images"], r["top1 %"]) for r in rows] == [("MixNet_S", str(IMAGES), f"{TOP1_HITS / IMAGES * 100:.2f}")]


def test_eval_jsonl_lists_the_mistakes(labelled_set, calibrated_mirror):
    root, labels = labelled_set
    result = _eval(str(root / "val"), "--jsonl")
    assert result.exit_code == 0
    mistakes = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(mistakes) == IMAGES - TOP1_HITS
    for row in mistakes:
        index = int(Path(row["input"]).stem[3:])
        assert index >= TOP1_HITS and row["expected"]["class_id"] == labels[index]
        assert row["predictions"][0]["class_id"] != row["expected"]["class_id"]
    assert "top1" in result.stderr  # the summary goes to stderr


def test_eval_limit_takes_an_even_spread(labelled_set, calibrated_mirror):
    root, _ = labelled_set
    summary = json.loads(_eval(str(root / "val"), "--limit", "4", "--json").stdout)
    assert summary["images"] == 4


def test_eval_rejects_folders_that_are_not_synsets(tmp_path, calibrated_mirror):
    (tmp_path / "cats").mkdir()
    result = _eval(str(tmp_path))
    assert result.exit_code == 2 and "'cats' is not an ImageNet-1k synset id" in result.stderr


def test_eval_rejects_a_malformed_list(tmp_path, calibrated_mirror):
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg 3\nb.jpg cat\n")
    result = _eval("--list", str(listing))
    assert result.exit_code == 2 and f"{listing}:2" in result.stderr


def test_eval_names_unreadable_images_and_refuses_an_empty_score(tmp_path, calibrated_mirror):
    folder = tmp_path / "val" / imagenet_synsets()[3]
    folder.mkdir(parents=True)
    (folder / "broken.jpg").write_text("not a picture")
    result = _eval(str(tmp_path / "val"), "--json")
    assert result.exit_code == 1 and result.stdout == ""
    assert "broken.jpg" in result.stderr and "no accuracy to report" in result.stderr.splitlines()[-1]
    # The same line on stderr in every format: --jsonl's row on stdout does not replace it
    lines = _eval(str(tmp_path / "val"), "--jsonl")
    assert lines.exit_code == 1 and "broken.jpg" in lines.stdout
    assert any(line.startswith("Error: ") and "broken.jpg" in line for line in lines.stderr.splitlines())
