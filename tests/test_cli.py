"""The `mixnet` command as a user meets it: usage errors, per-image errors, output formats, input kinds."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from imagegen import png_header_only
from mixnet_cli.cli import main


def _photo(path: Path, size: tuple[int, int] = (320, 240), colour: tuple[int, int, int] = (200, 120, 40)) -> Path:
    """A small image with some structure (a gradient and a block) so it decodes like a photo would."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    image.paste(colour, (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    image.save(path)
    return path


def _invoke(*args: str, input: bytes | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def _one_line_error(result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("Error:"), result.stderr
    return lines[-1]


@pytest.mark.parametrize("name", ["S", "s", "MixNet_S", "mixnet_s", "MIXNET-S"])
def test_model_names_in_any_spelling(name, tmp_path, random_mirror):
    result = _invoke("classify", str(_photo(tmp_path / "a.png")), "--model", name, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["model"] == "MixNet_S"


def test_unknown_model_is_a_usage_error_listing_valid_names(tmp_path, random_mirror):
    result = _invoke("classify", str(_photo(tmp_path / "a.png")), "--model", "XL")
    line = _one_line_error(result, exit_code=2)
    assert "XL" in line and "MixNet_S" in line and "MixNet_M" in line and "MixNet_L" in line
    assert random_mirror.requests == [], "a usage error must not touch the network"
    assert result.stdout == ""


@pytest.mark.parametrize("value, hint", [("127.0.0.1:8181", "http://127.0.0.1:8181"),
                                         ("ftp://127.0.0.1:8181", "http://127.0.0.1:8080")])
def test_a_server_that_is_not_an_http_url_is_a_usage_error(value, hint, tmp_path, random_mirror):
    result = _invoke("classify", str(_photo(tmp_path / "a.png")), "--server", value)
    line = _one_line_error(result, exit_code=2)
    assert f"--server '{value}': must be an http:// or https:// URL" in line and f"like {hint}" in line
    assert "InvalidSchema" not in line and "a bug" not in line
    assert random_mirror.requests == [] and result.stdout == ""


def test_a_mirror_that_is_not_an_http_url_is_refused_even_with_the_weights_cached(random_mirror):
    assert _invoke("download", "S").exit_code == 0
    result = _invoke("download", "S", "--mirror", "127.0.0.1:9")
    line = _one_line_error(result, exit_code=2)
    assert "--mirror '127.0.0.1:9': must be an http:// or https:// URL" in line and "like http://127.0.0.1:9" in line


def test_version_and_help():
    from importlib.metadata import version

    result = _invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"mixnet {version('mixnet-cli')}"
    for command in ([], ["classify"], ["download"], ["models"], ["doctor"]):
        result = _invoke(*command, "--help")
        assert result.exit_code == 0 and "Usage: mixnet" in result.stdout


def test_every_help_fits_an_80_column_terminal():
    import click

    def commands(command: click.Command, path: list[str]):
        yield path
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, [*path, name])

    for path in commands(main, []):
        shown = CliRunner().invoke(main, [*path, "--help"], terminal_width=80).output
        wide = [line for line in shown.splitlines() if len(line) > 80]
        assert not wide, f"mixnet {' '.join(path)} --help: {wide}"


def test_every_command_is_documented_in_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for name, command in main.commands.items():
        assert command.help, f"`mixnet {name}` has no help text"
        assert f"mixnet {name}" in readme, f"README does not mention `mixnet {name}`"


def test_bad_inputs_each_get_an_error_and_the_rest_are_classified(tmp_path, random_mirror):
    good = _photo(tmp_path / "good.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    no_images = tmp_path / "no-images"
    no_images.mkdir()
    (no_images / "readme.txt").write_text("hi")
    broken_link = tmp_path / "broken.jpg"
    broken_link.symlink_to(tmp_path / "gone.jpg")
    missing = tmp_path / "missing.jpg"
    args = [good, text, empty, truncated, no_images, broken_link, missing, str(tmp_path / "*.webp")]

    result = _invoke("classify", *map(str, args), "--json")

    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    assert [row["input"] for row in rows] == list(map(str, args))
    assert "predictions" in rows[0] and "error" not in rows[0]
    errors = {Path(row["input"]).name: row["error"] for row in rows[1:]}
    assert errors["notes.jpg"]["type"] == "NotAnImageError"
    assert "0 bytes" in errors["empty.png"]["message"]
    assert errors["truncated.jpg"]["type"] == "TruncatedImageError"
    assert errors["no-images"]["type"] == "NoImagesError"
    assert "broken symbolic link" in errors["broken.jpg"]["message"]
    assert errors["missing.jpg"]["type"] == "ImageNotFoundError"
    assert "matches no image files" in errors["*.webp"]["message"]
    for row in rows[1:]:
        assert row["input"] in row["error"]["message"], "each message names its input"
        assert "\n" not in row["error"]["message"]
    assert "Traceback" not in result.stderr


def test_table_is_the_default_and_shows_errors_in_place(tmp_path, random_mirror):
    good = _photo(tmp_path / "good.png")
    result = _invoke("classify", str(good), str(tmp_path / "nope.png"), "-k", "3")
    assert result.exit_code == 1
    blocks = result.stdout.strip().split("\n\n")
    assert blocks[0].startswith(f"{good}  (MixNet_S)")
    assert len(blocks[0].splitlines()) == 2 + 3  # header line, column line, 3 ranks
    assert "error: " in blocks[1] and "no such file" in blocks[1]
    # and on stderr too, as in every format: a script that reads stderr sees every failure
    assert f"Error: {tmp_path / 'nope.png'}: no such file" in result.stderr


def test_jsonl_csv_and_output_file_agree(tmp_path, random_mirror):
    images = [_photo(tmp_path / f"{i}.png", colour=(i * 60, 255 - i * 60, 90)) for i in range(3)]
    as_json = json.loads(_invoke("classify", *map(str, images), "--json").stdout)
    jsonl = _invoke("classify", *map(str, images), "--jsonl")
    assert [json.loads(line) for line in jsonl.stdout.splitlines()] == as_json
    out_file = tmp_path / "results.csv"
    result = _invoke("classify", *map(str, images), "--csv", "-o", str(out_file))
    assert result.exit_code == 0 and result.stdout == ""
    rows = list(csv.DictReader(io.StringIO(out_file.read_text())))
    assert len(rows) == 3 * 5
    first = as_json[0]["predictions"][0]
    assert rows[0]["input"] == str(images[0]) and rows[0]["rank"] == "1"
    assert int(rows[0]["class_id"]) == first["class_id"] and rows[0]["label"] == first["label"]
    assert float(rows[0]["score"]) == pytest.approx(first["score"], rel=1e-12)


def test_scores_are_a_softmax_in_descending_order(tmp_path, random_mirror):
    rows = json.loads(_invoke("classify", str(_photo(tmp_path / "a.png")), "-k", "1000", "--json").stdout)
    scores = [p["score"] for p in rows[0]["predictions"]]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-9)
    assert sorted(p["class_id"] for p in rows[0]["predictions"]) == list(range(1000))


@pytest.mark.paddle
def test_labels_are_paddleclas_label_list_verbatim(tmp_path, random_mirror):
    import paddleclas

    label_file = Path(paddleclas.__file__).parent / "ppcls/utils/imagenet1k_label_list.txt"
    expected = dict(line.split(" ", 1) for line in label_file.read_text().splitlines() if line.strip())
    rows = json.loads(_invoke("classify", str(_photo(tmp_path / "a.png")), "-k", "1000", "--json").stdout)
    for prediction in rows[0]["predictions"]:
        assert prediction["label"] == expected[str(prediction["class_id"])]


def test_directory_stdin_and_files_from(tmp_path, random_mirror):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    b = _photo(photos / "b.jpg")
    a = _photo(photos / "sub" / "a.png")
    (photos / "notes.txt").write_text("skip me")
    names = [row["input"] for row in json.loads(_invoke("classify", str(photos), "--json").stdout)]
    assert names == [str(b), str(a)]  # sorted walk: files of a folder, then its sub-folders
    flat = [row["input"] for row in json.loads(_invoke("classify", str(photos), "--no-recursive", "--json").stdout)]
    assert flat == [str(b)]

    from_stdin = json.loads(_invoke("classify", "-", "--json", input=b.read_bytes()).stdout)
    from_path = json.loads(_invoke("classify", str(b), "--json").stdout)
    assert from_stdin[0]["input"] == "-"
    assert from_stdin[0]["predictions"] == from_path[0]["predictions"]

    listing = f"{a}\n\n{b}\n".encode()
    listed = json.loads(_invoke("classify", "--files-from", "-", "--json", input=listing).stdout)
    assert [row["input"] for row in listed] == [str(a), str(b)]


def test_image_url_is_downloaded(tmp_path, random_mirror, file_server):
    served = tmp_path / "served"
    served.mkdir()
    photo = _photo(served / "cat.png")
    server = file_server(served)
    url = f"{server.url}/cat.png"
    rows = json.loads(_invoke("classify", url, f"{server.url}/missing.png", "--json").stdout)
    assert rows[0]["input"] == url
    assert rows[0]["predictions"] == json.loads(_invoke("classify", str(photo), "--json").stdout)[0]["predictions"]
    assert rows[1]["error"]["type"] == "ImageDownloadError" and "404" in rows[1]["error"]["message"]


def test_no_images_at_all_is_a_usage_error():
    line = _one_line_error(_invoke("classify"), exit_code=2)
    assert "no images given" in line


def test_asking_for_a_missing_gpu_is_an_error_not_a_fallback(tmp_path, random_mirror):
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has a GPU")
    result = _invoke("classify", str(_photo(tmp_path / "a.png")), "--device", "gpu")
    line = _one_line_error(result)
    assert "gpu" in line and "--device cpu" in line
    assert result.stdout == ""


def test_bad_device_name_is_a_usage_error(tmp_path):
    line = _one_line_error(_invoke("classify", str(_photo(tmp_path / "a.png")), "--device", "tpu"), exit_code=2)
    assert "tpu" in line


def test_debug_variable_shows_the_traceback(tmp_path, random_mirror, monkeypatch):
    monkeypatch.setenv("MIXNET_DEBUG", "1")
    result = CliRunner().invoke(main, ["classify", str(_photo(tmp_path / "a.png")), "--device", "tpu"])
    assert result.exception is not None and type(result.exception).__name__ == "UsageError"


def test_models_lists_the_seed_table(isolated_home):
    rows = json.loads(_invoke("models", "--json").stdout)
    assert [row["model"] for row in rows] == ["MixNet_S", "MixNet_M", "MixNet_L"]
    assert (rows[0]["top1"], rows[0]["top5"], rows[0]["flops_m"], rows[0]["params_m"]) == (76.28, 92.99, 252.977, 4.167)
    assert rows[2]["v100_ms_bs1_4_8"] == {"bs1": 3.16, "bs4": 5.55, "bs8": 8.03}
    assert not any(row["cached"] for row in rows)
    table = _invoke("models").stdout
    assert "78.60" in table and "579.017" in table
    # CSV writes booleans as JSON does (every command's CSV comes from one writer)
    assert {row["cached"] for row in csv.DictReader(io.StringIO(_invoke("models", "--csv").stdout))} == {"false"}


def test_installed_executable_classifies(tmp_path, random_mirror):
    """The console script a user runs, in a real process, with only the environment to configure it."""
    executable = Path(sys.executable).with_name("mixnet")
    if not executable.exists():
        pytest.skip("the mixnet console script is not installed next to this Python")
    image = _photo(tmp_path / "a.png")
    env = {**os.environ, "MIXNET_MIRROR": random_mirror.url}
    done = subprocess.run([str(executable), "classify", str(image), "--jsonl"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert row["input"] == str(image) and len(row["predictions"]) == 5
    assert "Traceback" not in done.stderr


def test_download_all_goes_on_past_a_model_the_mirror_lacks(random_mirror, monkeypatch):
    monkeypatch.setenv("MIXNET_RETRIES", "0")
    result = _invoke("download", "all")  # the mirror serves MixNet_S only
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert any(line.startswith("MixNet_S: downloaded ") for line in lines)
    assert [line for line in lines if line.startswith("Error: ")][-1] == "Error: 2 of 3 model(s) failed"
    for name in ("MixNet_M", "MixNet_L"):
        assert any(line.startswith("Error: ") and name in line for line in lines), result.stderr
    assert "Traceback" not in result.stderr


def _installed_mixnet() -> Path:
    executable = Path(sys.executable).with_name("mixnet")
    if not executable.exists():
        pytest.skip("the mixnet console script is not installed next to this Python")
    return executable


def test_ctrl_c_during_a_bulk_run_stops_at_once_and_leaves_no_results_file(tmp_path, random_mirror):
    import signal
    import time

    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(400):  # enough that the run is still going when the interrupt comes
        _photo(folder / f"{index:03d}.png", colour=(index % 255, 90, 200))
    env = {**os.environ, "MIXNET_MIRROR": random_mirror.url}
    warm = subprocess.run([str(_installed_mixnet()), "classify", str(folder / "000.png")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert warm.returncode == 0, warm.stderr  # weights and converted model cached first
    previous = tmp_path / "results.jsonl"
    previous.write_text("the previous results\n")
    process = subprocess.Popen([str(_installed_mixnet()), "classify", str(folder), "--jsonl", "-o", str(previous)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Interrupt once results are being written (the -o temporary file exists): a fixed delay could land in the
    # interpreter's start-up on a loaded machine, before any handler exists.
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".results.jsonl.*.tmp")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a few batches
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().endswith("Interrupted.") and "Traceback" not in stderr
    assert previous.read_text() == "the previous results\n"  # neither replaced nor half-written
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".results")) == []


def test_a_full_disk_for_the_results_is_a_one_line_error(tmp_path, random_mirror):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    image = _photo(tmp_path / "a.png")
    env = {**os.environ, "MIXNET_MIRROR": random_mirror.url}
    with open("/dev/full", "w") as full:
        done = subprocess.run([str(_installed_mixnet()), "classify", str(image), "--jsonl"], env=env, stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("Error: cannot write the results (No space left")
    assert "a bug" not in done.stderr and "Traceback" not in done.stderr


def test_help_does_not_import_paddle():
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom mixnet_cli.cli import main\n"
        "CliRunner().invoke(main, ['--help'])\nCliRunner().invoke(main, ['models'])\n"
        "heavy = [m for m in ('paddle', 'paddleclas', 'onnxruntime', 'cv2', 'torch') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_decompression_bomb_and_huge_files_are_errors(tmp_path, random_mirror, monkeypatch):
    bomb = png_header_only(tmp_path / "bomb.png", 20_000, 10_000)
    good = _photo(tmp_path / "good.png")
    rows = json.loads(_invoke("classify", str(bomb), str(good), "--json").stdout)
    assert rows[0]["error"]["type"] == "ImageTooLargeError" and "decompression bomb" in rows[0]["error"]["message"]
    assert "predictions" in rows[1]

    import mixnet_cli.images.encoded

    monkeypatch.setattr(mixnet_cli.images.encoded, "MAX_IMAGE_BYTES", good.stat().st_size - 1)
    rows = json.loads(_invoke("classify", str(good), "--json").stdout)
    assert rows[0]["error"]["type"] == "ImageTooLargeError" and "limit" in rows[0]["error"]["message"]


def test_usage_errors_are_one_line_too(tmp_path):
    for args in (["classify", "a.jpg", "--format", "xml"], ["nope"], ["download"],
                 ["export", "S", "--format", "tflite", "-o", str(tmp_path)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "--help" in lines[0], result.stderr


def test_file_names_that_are_not_utf8_do_not_break_the_output(tmp_path, random_mirror):
    folder = tmp_path / "names"
    folder.mkdir()
    good = _photo(folder / "a.png")
    odd = Path(os.fsdecode(bytes(folder) + b"/b\xff.png"))
    odd.write_bytes(good.read_bytes())
    for fmt in ("--csv", "--format=table"):
        result = _invoke("classify", str(folder), fmt)
        assert result.exit_code == 0, result.output
        assert "b\\xff.png" in result.stdout
    rows = json.loads(_invoke("classify", str(folder), "--json").stdout)
    assert rows[1]["input"].endswith("b\\xff.png")
    assert rows[0]["predictions"] == rows[1]["predictions"]


def test_images_between_pillows_warning_and_its_limit_are_not_refused(tmp_path, random_mirror):
    big = png_header_only(tmp_path / "big.png", 10_000, 10_000)  # 100 MP: Pillow warns, but allows it
    rows = json.loads(_invoke("classify", str(big), "--json").stdout)
    assert rows[0]["error"]["type"] != "ImageTooLargeError"  # it fails later, on its fake pixel data


def test_output_file_is_written_whole_and_checked_first(tmp_path, random_mirror):
    image = _photo(tmp_path / "a.png")
    line = _one_line_error(_invoke("classify", str(image), "-o", str(tmp_path / "missing" / "out.json")), 2)
    assert "does not exist" in line
    target = tmp_path / "out.json"
    assert _invoke("classify", str(image), "--json", "-o", str(target)).exit_code == 0
    assert json.loads(target.read_text())[0]["input"] == str(image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "mixnet-home", "out.json"]  # no temporary left


@pytest.mark.parametrize(
    "variable, value",
    [("MIXNET_TIMEOUT", "0"), ("MIXNET_TIMEOUT", "soon"), ("MIXNET_RETRIES", "abc"), ("MIXNET_OFFLINE", "maybe"),
     ("MIXNET_DEVICE", "tpu")],
)
def test_bad_environment_values_are_named(variable, value, tmp_path, random_mirror, monkeypatch):
    monkeypatch.setenv(variable, value)
    line = _one_line_error(_invoke("classify", str(_photo(tmp_path / "a.png"))), exit_code=2)
    assert variable in line and value in line


def test_a_mirror_that_is_not_a_url_is_a_usage_error(tmp_path):
    line = _one_line_error(_invoke("download", "S", "--mirror", "notaurl"), exit_code=2)
    assert "notaurl" in line and "http" in line


def test_files_from_skips_comments_and_may_be_empty(tmp_path, random_mirror):
    image = _photo(tmp_path / "a.png")
    listed = json.loads(_invoke("classify", "--files-from", "-", "--json", input=f"# photos\n{image}\n".encode()).stdout)
    assert [row["input"] for row in listed] == [str(image)]
    empty = _invoke("classify", "--files-from", "-", "--json", input=b"")
    assert empty.exit_code == 0 and json.loads(empty.stdout) == []


def test_a_binary_files_from_list_gives_rows_not_a_bug(tmp_path, random_mirror):
    """A NUL byte in a listed pattern (a binary file given as the list): that line's error row, as a NUL in a
    plain path gets, and the photo listed beside it classified (glob raised ValueError: "unexpected ... a bug")."""
    image = _photo(tmp_path / "a.png")
    listed = _invoke("classify", "--files-from", "-", "--json", input=f"a\0b/*.jpg\n{image}\n".encode())
    assert listed.exit_code == 1, listed.output
    rows = json.loads(listed.stdout)
    assert "error" in rows[0] and "pattern matches no image files" in rows[0]["error"]["message"]
    assert rows[1]["input"] == str(image) and "predictions" in rows[1]
    assert "a bug" not in listed.stderr


def test_a_first_run_writes_nothing_outside_the_cache(tmp_path, random_mirror):
    """Download, conversion and every engine's import: the user's home, the working directory and the temporary
    folder stay untouched (ONNX Runtime's telemetry writes a session file into the last as it loads)."""
    home, work, cache, temporary = tmp_path / "home", tmp_path / "work", tmp_path / "cache", tmp_path / "tmp"
    home.mkdir()
    work.mkdir()
    temporary.mkdir()
    image = _photo(tmp_path / "a.png")
    env = {**os.environ, "HOME": str(home), "MIXNET_HOME": str(cache), "MIXNET_MIRROR": random_mirror.url,
           "TMPDIR": str(temporary)}
    env.pop("XDG_CACHE_HOME", None)
    for engine in ("auto", "onnxruntime", "openvino"):
        done = subprocess.run([sys.executable, "-m", "mixnet_cli", "classify", str(image), "--engine", engine, "--json"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    assert [p for p in home.rglob("*")] == []
    assert [p for p in work.rglob("*")] == []
    assert [p for p in temporary.rglob("*")] == []


def test_glob_patterns_expand_for_shells_that_do_not(tmp_path, random_mirror):
    (tmp_path / "sub").mkdir()
    first = _photo(tmp_path / "b.png")
    second = _photo(tmp_path / "sub" / "a.png")
    (tmp_path / "c.txt").write_text("no")
    rows = json.loads(_invoke("classify", str(tmp_path / "**" / "*.png"), "--json").stdout)
    assert [row["input"] for row in rows] == [str(first), str(second)]


def test_a_recursive_glob_follows_no_symlinked_folder(tmp_path, monkeypatch):
    """As a directory input: `**` does not go into a link back up (glob went round it, one photo dozens of times,
    a large tree for minutes) nor into a linked folder (its photos twice); hidden folders stay out unless named;
    a relative pattern's names are as a one-level glob's."""
    from mixnet_cli.images.inputs import expand_inputs

    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / ".hidden").mkdir()
    for photo in (tree / "top.png", tree / "a" / "x.png", tree / "a" / "b" / "y.png", tree / ".hidden" / "z.png"):
        _photo(photo)
    (tree / "a" / "up").symlink_to("..")
    (tree / "link").symlink_to("a")
    expected = [str(tree / "a" / "b" / "y.png"), str(tree / "a" / "x.png"), str(tree / "top.png")]
    assert [item.name for item in expand_inputs([str(tree / "**" / "*.png")])] == expected
    assert [item.name for item in expand_inputs([str(tree / "**")])] == expected
    assert [item.name for item in expand_inputs([str(tree / "**" / ".hidden" / "*.png")])] == [
        str(tree / ".hidden" / "z.png")]
    # a linked folder named in the pattern is searched, as a linked folder given as the input is
    assert [item.name for item in expand_inputs([str(tree / "link" / "**" / "*.png")])] == [
        str(tree / "link" / "b" / "y.png"), str(tree / "link" / "x.png")]
    monkeypatch.chdir(tmp_path)
    assert [item.name for item in expand_inputs(["./tree/**/*.png"])] == [  # as a one-level glob names them
        "tree/a/b/y.png", "tree/a/x.png", "tree/top.png"]
    assert [item.name for item in expand_inputs(["./tree/*.png"])] == ["tree/top.png"]
    assert [item.name for item in expand_inputs([str(tree / "t**.png")])] == [str(tree / "top.png")]  # glob's *
    # classify-dataset lists a glob the same way (lazily, for millions of files), and a NUL byte matches nothing
    from mixnet_cli.distributed.listing import iter_inputs

    rows = list(iter_inputs([str(tree / "**" / "*.png"), "a\0b/**/*.png"]))
    assert sorted(row.input for row in rows[:-1]) == expected
    assert rows[-1].error is not None and "pattern matches no image files" in str(rows[-1].error)


def test_quiet_prints_nothing_but_results(tmp_path, random_mirror):
    good = _photo(tmp_path / "a.png")
    result = _invoke("classify", str(good), str(tmp_path / "missing.png"), "--jsonl", "-q", "-v")
    assert result.exit_code == 1
    assert result.stderr == ""
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == [str(good), str(tmp_path / "missing.png")]


def test_doctor_reports_the_setup_and_fails_on_a_broken_part(isolated_home, monkeypatch):
    monkeypatch.setenv("MIXNET_OFFLINE", "1")
    result = _invoke("doctor", "--json")
    checks = {row["check"]: row for row in json.loads(result.stdout)}
    from mixnet_cli.base.third_party import paddle_missing

    if paddle_missing() is None:
        assert checks["paddlepaddle"]["status"] == "ok" and checks["paddleclas"]["value"] == "2.6.0"
    else:  # the core install: paddle is an extra, not a failure
        assert checks["paddleclas"]["value"] == "not installed" and checks["paddleclas"]["status"] == "info"
    assert checks["onnx"]["status"] == "ok" and checks["openvino"]["status"] == "ok"
    assert checks["cache directory"]["value"].startswith(str(isolated_home))
    assert checks["cache writable"]["status"] == "ok"
    assert checks["device auto picks"]["value"].startswith(("cpu", "gpu"))
    from mixnet_cli.base.third_party import module_installed

    if module_installed("torch"):
        assert checks["engine torch"]["value"] == "ready" and checks["torch CUDA"]["value"]
    else:  # an extra: named with what to install, not a failure
        from mixnet_cli.base.third_party import install_hint

        assert checks["torch"]["value"] == "not installed" and install_hint("torch") in checks["engine torch"]["hint"]
    assert "engine auto picks" in checks and checks["weights URLs"]["value"] == "not checked (offline)"
    assert result.exit_code == 0, [row for row in checks.values() if row["status"] == "fail"]

    monkeypatch.delenv("MIXNET_OFFLINE")
    monkeypatch.setenv("MIXNET_MIRROR", "http://127.0.0.1:9")  # the discard port: nothing listens there
    result = _invoke("doctor", "--json")
    rows = json.loads(result.stdout)
    assert result.exit_code == 1
    assert any(row["check"] == "MixNet_S URL" and row["status"] == "fail" and row["hint"] for row in rows)


def test_inputs_that_cannot_exist_fail_before_any_download(tmp_path, random_mirror, isolated_home):
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    args = [str(tmp_path / "typo.jpg"), str(empty), str(tmp_path / "nothing-*.png")]
    for extra in ([], ["--offline"]):
        result = _invoke("classify", *args, "--jsonl", *extra)
        assert result.exit_code == 1
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        assert [row["input"] for row in rows] == args
        assert [row["error"]["type"] for row in rows] == ["ImageNotFoundError", "NoImagesError", "NoImagesError"]
        assert "the model was not loaded" in result.stderr.splitlines()[-1]
        assert "offline" not in result.stderr and "download" not in result.stderr
    assert random_mirror.requests == []  # nothing was fetched
    assert not (isolated_home / "weights").exists() or not any((isolated_home / "weights").iterdir())
    # One input that can be classified among them: the model is loaded, and the others keep their errors.
    good = _photo(tmp_path / "good.jpg")
    mixed = _invoke("classify", str(good), *args, "--jsonl")
    assert mixed.exit_code == 1
    assert [("predictions" in json.loads(line)) for line in mixed.stdout.splitlines()] == [True, False, False, False]


def test_the_api_takes_what_the_command_line_takes(tmp_path, random_mirror, file_server):
    from mixnet_cli import Classifier
    from mixnet_cli.images.inputs import expand_inputs

    served = tmp_path / "served"
    served.mkdir()
    photo = _photo(served / "cat.png")
    url = f"{file_server(served).url}/cat.png"
    classifier = Classifier("S")
    by_path = classifier.classify(photo)
    assert classifier.classify(url).predictions == by_path.predictions
    assert classifier.classify(url).input == url
    assert classifier.classify(photo.read_bytes()).predictions == by_path.predictions
    many = list(classifier.classify_many([url, str(photo), *expand_inputs([str(served)])]))
    assert [r.input for r in many] == [url, str(photo), str(photo)]
    assert all(r.predictions == by_path.predictions for r in many)


def test_quiet_holds_back_onnxruntimes_telemetry_line_and_nothing_else(capfd):
    from mixnet_cli.base.third_party import _stderr_without

    with _stderr_without("telemetry"):
        os.write(2, b"\x1b[0;93m[W:onnxruntime] Failed to persist telemetry device ID\x1b[m\nsomething else\n")
    err = capfd.readouterr().err
    assert "telemetry" not in err and "\x1b" not in err and err == "something else\n"
    with _stderr_without("telemetry", unless=True):
        os.write(2, b"telemetry kept when the cache can take its file\n")
    assert "telemetry kept" in capfd.readouterr().err


def test_quiet_on_a_read_only_cache_prints_nothing_but_results(tmp_path, random_mirror, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("MIXNET_HOME", str(home))
    photo = _photo(tmp_path / "photo.jpg")
    assert _invoke("download", "S").exit_code == 0
    code = ("import sys\nfrom mixnet_cli.cli import main\n"
            f"main(['classify', {str(photo)!r}, '--json', '-q', '--offline'])\n")
    os.chmod(home, 0o555)
    try:
        if os.access(home, os.W_OK):
            pytest.skip("running as root: a directory cannot be made read-only here")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "MIXNET_HOME": str(home)})
    finally:
        os.chmod(home, 0o755)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and json.loads(done.stdout)[0]["predictions"]


def test_shell_completion_offers_models_engines_and_devices():
    def complete(words: str) -> list[str]:
        env = {"_MIXNET_COMPLETE": "bash_complete", "COMP_WORDS": f"mixnet {words}", "COMP_CWORD": str(len(words.split()) + (1 if words.endswith(" ") else 0))}
        result = CliRunner().invoke(main, [], env=env, prog_name="mixnet")
        return [line.split(",", 1)[1] for line in result.stdout.splitlines() if "," in line]

    assert complete("classify --engine o") == ["onnxruntime", "openvino"]
    assert complete("classify --device g") == ["gpu", "gpu:0"]
    assert "MixNet_L" in complete("download ") and "all" in complete("download ")
    assert complete("cache rm Mix") == ["MixNet_S", "MixNet_M", "MixNet_L"]


def test_threads_come_from_the_flag_else_omp_num_threads(tmp_path, random_mirror, monkeypatch):
    photo = str(_photo(tmp_path / "photo.jpg"))
    flag = _invoke("classify", photo, "--threads", "1", "-v", "--json")
    assert flag.exit_code == 0 and "1 thread(s)" in flag.stderr
    monkeypatch.setenv("OMP_NUM_THREADS", "1,1")
    assert "1 thread(s)" in _invoke("classify", photo, "-v", "--json").stderr
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    assert "OMP_NUM_THREADS" in _one_line_error(_invoke("classify", photo, "--json"), exit_code=2)


def test_a_device_from_the_environment_is_named_in_its_error(tmp_path, random_mirror, monkeypatch):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    photo = str(_photo(tmp_path / "photo.jpg"))
    monkeypatch.setenv("MIXNET_DEVICE", "gpu")
    line = _one_line_error(_invoke("classify", photo, "--engine", "onnxruntime"))
    assert "device 'gpu'" in line and "environment variable MIXNET_DEVICE" in line
    monkeypatch.delenv("MIXNET_DEVICE")
    assert "environment variable" not in _one_line_error(_invoke("classify", photo, "--engine", "onnxruntime",
                                                                  "--device", "gpu"))


@pytest.mark.parametrize("how", ["directory", "glob"])
def test_a_broken_link_in_a_directory_or_glob_gets_its_error_row(how, tmp_path, random_mirror):
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder / "a.png")
    (folder / "b.jpg").symlink_to(tmp_path / "gone.jpg")
    (folder / "c.txt").symlink_to(tmp_path / "gone.txt")  # not an image's name: not listed, as before
    result = _invoke("classify", str(folder) if how == "directory" else str(folder / "*"), "--json")
    assert result.exit_code == 1, result.output
    rows = json.loads(result.stdout)
    assert [Path(row["input"]).name for row in rows] == ["a.png", "b.jpg"]
    assert "predictions" in rows[0]
    assert rows[1]["error"]["type"] == "ImageNotFoundError"
    assert rows[1]["error"]["message"] == f"{folder / 'b.jpg'}: broken symbolic link (to {tmp_path / 'gone.jpg'}); fix or remove the link"
    assert f"Error: {rows[1]['error']['message']}" in result.stderr


@pytest.mark.parametrize("option", ["-o", "--embed-npy"])
def test_an_output_in_a_directory_that_takes_no_files_is_a_one_line_usage_error(option, tmp_path, random_mirror):
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    target = "/proc/results.json" if option == "-o" else "/proc/features.npy"
    result = _invoke("classify", str(_photo(tmp_path / "a.png")), option, target)
    line = _one_line_error(result, exit_code=2)
    assert line.startswith(f"Error: {option} {target}: cannot write a file in /proc (") and "choose another path" in line
    assert "a bug" not in line and result.stdout == ""
    assert random_mirror.requests == [], "found before the model loads"


def test_a_root_log_handler_added_by_a_library_does_not_repeat_the_notices(tmp_path, random_mirror):
    # paddleclas gives the root logger a handler as it loads (the paddle engine imports it): the one-time notice
    # of the conversion was then printed twice, once in paddle's format.
    program = ("import logging, sys; logging.basicConfig(format='ROOT %(message)s'); "
               "sys.argv = ['mixnet'] + sys.argv[1:]; from mixnet_cli.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", program, "classify", str(_photo(tmp_path / "a.png")), "-k", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"mixnet: downloading MixNet_S weights (16.7 MB) from {random_mirror.url}/MixNet_S_pretrained.pdparams",
        "mixnet: converting MixNet_S to ONNX (once)...",
    ]
