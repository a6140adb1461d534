"""Your own fine-tuned MixNet: weights with any number of classes (here 7, made from the calibrated weights with a
new classifier), the architecture read from the file, class names from a label file in either of PaddleClas's
layouts; held to paddleclas's own network built with that class count."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imagegen import scene
from weightgen import FINE_TUNED_CLASSES, make_fine_tuned_weights
from mixnet_cli import Classifier
from mixnet_cli.cli import main
from mixnet_cli.base.errors import UsageError, WeightsError
from mixnet_cli.images.postprocess import softmax

NAMES = list(FINE_TUNED_CLASSES)


@pytest.fixture(scope="module")
def fine_tuned(calibrated_weights, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MixNet_S weights with a 7-class classifier (weightgen.make_fine_tuned_weights)."""
    return make_fine_tuned_weights(calibrated_weights("MixNet_S"),
                                   tmp_path_factory.mktemp("fine-tuned") / "flowers_mixnet_s.pdparams")


@pytest.fixture(scope="module")
def label_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("labels")
    id_map = directory / "flowers_label_list.txt"  # PaddleClas's class_id_map_file, ids out of order on purpose
    id_map.write_text("".join(f"{i} {NAMES[i]}\n" for i in [1, 0, 2, 3, 4, 5, 6]))
    plain = directory / "names.txt"
    plain.write_text("\n".join(NAMES) + "\n\n")
    short = directory / "six.txt"
    short.write_text("\n".join(NAMES[:6]) + "\n")
    return {"id_map": id_map, "plain": plain, "short": short}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("flower-photos")
    rng = np.random.default_rng(21)
    paths = []
    for index in range(5):
        path = directory / f"photo{index}.jpg"
        Image.fromarray(scene(rng, 320, 240)).save(path, quality=92)
        paths.append(path)
    return paths


def _classify(*args: str) -> tuple[int, list[dict], str]:
    result = CliRunner().invoke(main, ["classify", *args, "--json"])
    return result.exit_code, (json.loads(result.stdout) if result.stdout.strip() else []), result.stderr


def test_own_weights_and_labels_classify_with_their_classes(fine_tuned, label_files, photos, isolated_home):
    code, rows, stderr = _classify(*map(str, photos), "--weights", str(fine_tuned), "--labels",
                                   str(label_files["id_map"]), "-k", "7")
    assert code == 0, stderr
    import hashlib

    name = f"flowers_mixnet_s-{hashlib.sha256(fine_tuned.read_bytes()).hexdigest()[:7]}"
    for row in rows:
        assert row["model"] == name and row["architecture"] == "MixNet_S"  # detected from the file's shapes
        assert sorted(p["class_id"] for p in row["predictions"]) == list(range(7))
        assert all(p["label"] == NAMES[p["class_id"]] for p in row["predictions"])
        assert sum(p["score"] for p in row["predictions"]) == pytest.approx(1.0, abs=1e-5)
    assert len({row["predictions"][0]["class_id"] for row in rows}) > 1, "the pictures should get different answers"
    # Converted once and cached under the file's sha256, like the released weights.
    import hashlib

    sha256 = hashlib.sha256(fine_tuned.read_bytes()).hexdigest()
    assert (isolated_home / "onnx" / sha256 / "MixNet_S.onnx").is_file()
    # Either label layout gives the same names; without a file, classes are named by their id.
    plain = _classify(str(photos[0]), "--weights", str(fine_tuned), "--labels", str(label_files["plain"]), "-k", "7")[1]
    assert plain[0]["predictions"] == rows[0]["predictions"]
    unnamed = _classify(str(photos[0]), "--weights", str(fine_tuned))[1]
    assert [p["label"] for p in unnamed[0]["predictions"]] == [str(p["class_id"]) for p in unnamed[0]["predictions"]]
    # The API takes the same.
    api = Classifier(weights=fine_tuned, labels=label_files["id_map"])
    assert api.spec.num_classes == 7 and api.labels == tuple(NAMES)
    assert [p.to_dict() for p in api.classify(photos[0], topk=7).predictions] == rows[0]["predictions"]


def test_a_mismatch_is_a_one_line_error_before_any_work(fine_tuned, label_files, photos, isolated_home, tmp_path):
    code, _, stderr = _classify(str(photos[0]), "--weights", str(fine_tuned), "--labels", str(label_files["short"]))
    assert code == 2 and "names 6 classes, but the weights have 7" in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = _classify(str(photos[0]), "--weights", str(fine_tuned), "-m", "L")
    assert code == 1 and "does not hold MixNet_L" in stderr and "leave out --model" in stderr
    not_weights = tmp_path / "notes.pdparams"
    not_weights.write_text("hello")
    code, _, stderr = _classify(str(photos[0]), "--weights", str(not_weights))
    assert code == 1 and str(not_weights) in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = _classify(str(photos[0]), "--weights", str(tmp_path / "missing.pdparams"))
    assert code == 2 and "no such file" in stderr
    assert not (isolated_home / "onnx").exists(), "nothing was converted for a failed run"
    with pytest.raises(UsageError):
        Classifier(weights=fine_tuned, labels=label_files["short"])
    with pytest.raises(WeightsError):
        Classifier("M", weights=fine_tuned)


def test_own_weights_export_with_their_class_count(fine_tuned, tmp_path, isolated_home):
    import onnxruntime

    result = CliRunner().invoke(main, ["export", "--weights", str(fine_tuned), "--format", "onnx", "-o",
                                       str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    [model] = (tmp_path / "out").glob("*.onnx")
    assert model.name.startswith("flowers_mixnet_s-")  # named after the weights, not MixNet_S.onnx
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": np.zeros((2, 3, 224, 224), np.float32)})[0]
    assert logits.shape == (2, 7) and "N x 7" in result.stderr


def test_eval_scores_own_weights_from_a_list(fine_tuned, label_files, photos, isolated_home, tmp_path):
    answers = Classifier(weights=fine_tuned)
    truth = [answers.classify(p).predictions[0].class_id for p in photos]
    listing = tmp_path / "val.txt"
    listing.write_text("".join(f"{p} {t}\n" for p, t in zip(photos, truth)))
    result = CliRunner().invoke(main, ["eval", "--list", str(listing), "--root", "/", "--weights", str(fine_tuned),
                                       "--labels", str(label_files["plain"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top1"] == 100.0


@pytest.mark.paddle
@pytest.mark.parametrize("engine", ["auto", "dygraph", "paddle"])
def test_own_weights_give_paddleclas_answers(engine, fine_tuned, photos, isolated_home):
    from paddleclas_reference import paddleclas_decode, paddleclas_transform

    import paddle
    from paddleclas.ppcls.arch.backbone.model_zoo import mixnet

    network = mixnet.MixNet_S(pretrained=False, class_num=7)
    network.set_state_dict(paddle.load(str(fine_tuned)))
    network.eval()
    batch = np.stack([paddleclas_transform(paddleclas_decode(p)) for p in photos])
    with paddle.no_grad():
        want = paddle.nn.functional.softmax(network(paddle.to_tensor(batch)), axis=-1).numpy()
    classifier = Classifier(weights=fine_tuned, engine=engine)
    got = softmax(classifier.logits(np.stack([classifier.preprocess(p) for p in photos])))
    assert got.shape == (len(photos), 7)
    assert np.abs(got - want).max() <= 1e-4
    assert [list(np.argsort(-r, kind="stable")[:5]) for r in got] == [list(np.argsort(-r, kind="stable")[:5]) for r in want]


def test_labels_for_the_released_weights_are_counted_before_any_download(label_files, photos, tmp_path,
                                                                          random_mirror):
    says = (f"--labels {label_files['short']} names 6 classes, but MixNet_S's released weights have 1000; give a "
            "label file of 1000 names, or your own weights with --weights")
    code, _, stderr = _classify(str(photos[0]), "--labels", str(label_files["short"]))
    assert code == 2 and stderr.strip().splitlines() == [f"Error: {says} (see `mixnet classify --help`)"]
    listing = tmp_path / "val.txt"
    listing.write_text(f"{photos[0]} 0\n")
    result = CliRunner().invoke(main, ["eval", "--list", str(listing), "--labels", str(label_files["short"])])
    assert result.exit_code == 2 and says in result.stderr
    with pytest.raises(UsageError, match="names 6 classes, but MixNet_S's released weights have 1000"):
        Classifier(labels=label_files["short"])
    assert random_mirror.requests == [], "the label file is counted before the weights are fetched"


def test_a_photo_given_as_weights_is_named_for_what_it_is(photos, isolated_home):
    result = CliRunner().invoke(main, ["download", "S", "--from", str(photos[0])])
    assert result.exit_code == 1 and "is a JPEG image, not a weights file" in result.stderr
    code, _, stderr = _classify(str(photos[0]), "--weights", str(photos[0]))
    assert code == 1 and "is a JPEG image, not a weights file" in stderr


@pytest.mark.parametrize("content, says", [
    (random.Random(0).randbytes(4096), "is not a pickled state dict (.pdparams): its first bytes are not a pickle's"),
    (b"0 daisy\n1 rose\n2 tulip\n", "is a text file, not a pickled state dict (.pdparams)"),
    (b"\x80\x04\xff" + bytes(64), "is damaged: it begins as a pickled state dict (.pdparams) but its data is malformed"),
], ids=["random-bytes", "a-label-list", "a-damaged-pickle"])
def test_a_file_that_is_not_weights_is_named_in_words_with_what_to_pass(content, says, tmp_path, photos,
                                                                        isolated_home):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    code, _, stderr = _classify(str(photos[0]), "--weights", str(path))
    # The whole line: no exception names (KeyError: 255, IndexError: pop from empty list) from the unpickler.
    assert code == 1 and stderr.strip().splitlines() == [
        f"Error: {path} {says}; pass the .pdparams file PaddleClas's training saved "
        "(e.g. output/MixNet_S/best_model.pdparams)"]


def test_few_classes_default_to_all_of_them_and_odd_files_are_refused(fine_tuned, tmp_path, photos, isolated_home,
                                                                       monkeypatch):
    from weightgen import save_pdparams

    from mixnet_cli.images.labels import read_label_file
    from mixnet_cli.weights.pdparams import read_state_dict

    state = read_state_dict(fine_tuned)
    three = dict(state, **{"output.weight": state["output.weight"][:, :3].copy(),
                           "output.bias": state["output.bias"][:3].copy()})
    path = save_pdparams(three, tmp_path / "three.pdparams")
    code, rows, stderr = _classify(str(photos[0]), "--weights", str(path))
    assert code == 0, stderr
    assert len(rows[0]["predictions"]) == 3  # the default top-5, capped at the model's classes
    broken = dict(state)
    broken["output.bias"] = state["output.bias"].copy()
    broken["output.bias"][2] = np.nan
    with pytest.raises(WeightsError, match="NaN or infinite"):
        Classifier(weights=save_pdparams(broken, tmp_path / "diverged.pdparams"))
    for text, problem in [("0 cat\n0 dog\n1 bird\n", "appears twice"), ("1 cat\n2 dog\n3 bird\n", "0 is missing"),
                          ("0 cat\n1\n2 bird\n", "no name")]:
        labels = tmp_path / "labels.txt"
        labels.write_text(text)
        with pytest.raises(UsageError, match=problem):
            read_label_file(labels, 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "5000")
    with pytest.raises(UsageError, match="1 to 1024"):
        Classifier(weights=path)


def test_benchmark_times_own_weights(fine_tuned, isolated_home):
    result = CliRunner().invoke(main, ["benchmark", "--weights", str(fine_tuned), "-b", "1", "--repeats", "2",
                                       "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["model"].startswith("flowers_mixnet_s-") and row["architecture"] == "MixNet_S" and row["median_ms"] > 0 and row["paddleclas_v100_trt_ms"] is None


def test_two_fine_tunes_are_told_apart_everywhere_and_keep_their_architecture(fine_tuned, label_files, photos,
                                                                              isolated_home, tmp_path):
    """Named by the weights (file stem and the first 7 hex digits of their sha256) in classify's JSON, CSV and
    table, eval's summary and `cache list`; the architecture in a field of its own."""
    import csv
    import hashlib
    import io
    import pickle

    from mixnet_cli.weights.pdparams import read_state_dict

    state = read_state_dict(fine_tuned.read_bytes())
    state["output.bias"] = state["output.bias"] + 0.5  # another fine-tune, saved under the same file name
    other = tmp_path / "epoch9" / fine_tuned.name
    other.parent.mkdir()
    other.write_bytes(pickle.dumps(state, protocol=4))
    names = [f"flowers_mixnet_s-{hashlib.sha256(p.read_bytes()).hexdigest()[:7]}" for p in (fine_tuned, other)]
    assert names[0] != names[1]

    image = str(photos[0])
    for weights, name in zip((fine_tuned, other), names):
        [row] = _classify(image, "--weights", str(weights))[1]
        assert (row["model"], row["architecture"]) == (name, "MixNet_S")
    table = CliRunner().invoke(main, ["classify", image, "--weights", str(fine_tuned)]).stdout
    assert table.startswith(f"{image}  ({names[0]}, MixNet_S)\n")
    rows = list(csv.DictReader(io.StringIO(CliRunner().invoke(
        main, ["classify", image, "--weights", str(other), "--csv"]).stdout)))
    assert {(row["model"], row["architecture"]) for row in rows} == {(names[1], "MixNet_S")}

    listed = json.loads(CliRunner().invoke(main, ["cache", "list", "--json"]).stdout)
    assert {(row["model"], row["architecture"]) for row in listed if row["kind"] == "onnx"} == \
        {(name, "MixNet_S") for name in names}

    # export: the ONNX file's metadata names it so, with its own labels.
    import onnx

    exported = CliRunner().invoke(main, ["export", "--weights", str(other), "--labels", str(label_files["plain"]),
                                         "-o", str(tmp_path / "deploy")])
    assert exported.exit_code == 0, exported.output
    # named after the model, so it never replaces the released model's MixNet_S.onnx; the usage lines say so
    assert exported.stdout == f"{tmp_path / 'deploy' / names[1]}.onnx\n" and f"{names[1]}.onnx" in exported.stderr
    metadata = {entry.key: entry.value for entry in onnx.load(str(tmp_path / "deploy" / f"{names[1]}.onnx")).metadata_props}
    assert (metadata["model_name"], metadata["architecture"]) == (names[1], "MixNet_S")
    assert json.loads(metadata["labels"]) == NAMES and metadata["num_classes"] == "7"

    # eval, from a list file.
    listing = tmp_path / "val.txt"
    listing.write_text("".join(f"{photo} {index % 7}\n" for index, photo in enumerate(photos)))
    summary = CliRunner().invoke(main, ["eval", "--list", str(listing), "--weights", str(other), "--json"])
    assert summary.exit_code == 0, summary.output
    assert (json.loads(summary.stdout)["model"], json.loads(summary.stdout)["architecture"]) == (names[1], "MixNet_S")


def test_maps_of_a_fine_tune_keep_its_architecture(fine_tuned, photos, isolated_home, tmp_path):
    """--cam (JSON, CSV, table) and classify(cam=True / cam_class=...) name the architecture as a run without."""
    import csv
    import io

    image, weights = str(photos[0]), str(fine_tuned)
    code, [row], _ = _classify(image, "--weights", weights, "--cam", str(tmp_path / "maps"))
    assert code == 0 and row["model"].startswith("flowers_mixnet_s-") and row["architecture"] == "MixNet_S"
    rows = list(csv.DictReader(io.StringIO(CliRunner().invoke(
        main, ["classify", image, "--weights", weights, "--cam", str(tmp_path / "maps"), "--csv"]).stdout)))
    assert {row["architecture"] for row in rows} == {"MixNet_S"}
    table = CliRunner().invoke(main, ["classify", image, "--weights", weights, "--cam", str(tmp_path / "maps")])
    assert table.stdout.startswith(f"{image}  ({row['model']}, MixNet_S)\n")
    classifier = Classifier(weights=fine_tuned)
    for result in (classifier.classify(photos[0], cam=True), classifier.classify(photos[0], cam_class=2)):
        assert result.cam is not None and result.to_dict()["architecture"] == "MixNet_S"
