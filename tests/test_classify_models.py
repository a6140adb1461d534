"""`mixnet classify` with several models (-m S -m M, -m all): one result per image and model, in every format."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from mixnet_cli.cli import main


@pytest.fixture
def two_model_mirror(random_weights_dir: Path, tmp_path_factory, file_server, monkeypatch: pytest.MonkeyPatch):
    """A mirror serving random MixNet_S and MixNet_M weights (not MixNet_L)."""
    from weightgen import make_random_weights

    directory = tmp_path_factory.mktemp("two-models")
    shutil.copy(random_weights_dir / "MixNet_S_pretrained.pdparams", directory)
    make_random_weights("MixNet_M", directory / "MixNet_M_pretrained.pdparams", seed=1)
    server = file_server(directory)
    monkeypatch.setenv("MIXNET_MIRROR", server.url)
    return server


def _images(tmp_path: Path) -> list[str]:
    paths = []
    for index, colour in enumerate([(200, 30, 30), (20, 160, 90)]):
        path = tmp_path / f"{index}.png"
        image = Image.linear_gradient("L").resize((96, 72)).convert("RGB")
        image.paste(colour, (10, 10, 50, 40))
        image.save(path)
        paths.append(str(path))
    (tmp_path / "notes.jpg").write_text("not an image\n")
    return paths + [str(tmp_path / "notes.jpg")]


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_each_model_named_classifies_every_image(tmp_path, two_model_mirror):
    images = _images(tmp_path)
    both = _invoke("classify", *images, "-m", "S", "-m", "m", "-m", "MixNet_S", "--jsonl", "-k", "2")
    assert both.exit_code == 1, both.output  # notes.jpg
    rows = [json.loads(line) for line in both.stdout.splitlines()]
    assert [(row["model"], row["input"]) for row in rows] == [
        (model, image) for model in ("MixNet_S", "MixNet_M") for image in images]
    alone = {model: [json.loads(line) for line in _invoke("classify", *images, "-m", model, "--jsonl", "-k", "2")
                     .stdout.splitlines()] for model in ("S", "M")}
    assert rows == alone["S"] + alone["M"], "the same answers as each model alone"
    assert both.stderr.count("notes.jpg: not an image") == 1, "an image's error is said once, not per model"
    assert both.stderr.splitlines()[-1] == "Error: 2 of 6 results (3 image(s), 2 models) failed"


def test_several_models_in_table_csv_and_json(tmp_path, two_model_mirror):
    images = _images(tmp_path)[:2]
    table = _invoke("classify", *images, "-m", "S", "-m", "M", "-k", "1")
    assert table.exit_code == 0, table.output
    assert [line for line in table.stdout.splitlines() if line.endswith(")")] == [
        f"{image}  ({model})" for model in ("MixNet_S", "MixNet_M") for image in images]
    rows = list(csv.DictReader(io.StringIO(_invoke("classify", *images, "-m", "S", "-m", "M", "--csv", "-k", "1").stdout)))
    assert [(row["model"], row["input"]) for row in rows] == [
        (model, image) for model in ("MixNet_S", "MixNet_M") for image in images]
    array = json.loads(_invoke("classify", *images, "-m", "S", "-m", "M", "--json", "--embed").stdout)
    assert [row["model"] for row in array] == ["MixNet_S"] * 2 + ["MixNet_M"] * 2
    assert all(len(row["features"]) == 1536 for row in array)


def test_all_fetches_every_models_weights_before_any_output(tmp_path, two_model_mirror):
    result = _invoke("classify", *_images(tmp_path)[:1], "-m", "all", "--csv")
    assert result.exit_code == 1, result.output
    assert result.stdout == "", "nothing printed before the run is known to finish"
    assert "MixNet_L" in result.stderr.splitlines()[-1]
    assert any(request.endswith("MixNet_L_pretrained.pdparams") for request in two_model_mirror.requests)


@pytest.mark.parametrize("extra, words", [
    (["--embed-npy", "features.npy"], "--embed-npy writes one row per image"),
    (["--weights", "mine.pdparams"], "--weights mine.pdparams is one model"),
])
def test_combinations_that_take_one_model_are_usage_errors(extra, words, tmp_path, two_model_mirror, monkeypatch):
    (tmp_path / "mine.pdparams").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    result = _invoke("classify", *_images(tmp_path)[:1], "-m", "S", "-m", "M", *extra)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"Error: {words}") and len(result.stderr.splitlines()) == 1
    assert two_model_mirror.requests == []
