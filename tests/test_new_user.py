"""What a new user meets first, made smooth: the results file's format from its name, names and devices as other
tools spell them, a top-k larger than the model's classes, and flags that contradict each other."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from mixnet_cli.cli import main


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _photo(path: Path) -> Path:
    image = Image.linear_gradient("L").resize((320, 240)).convert("RGB")
    image.paste((200, 120, 40), (80, 60, 160, 120))
    image.save(path)
    return path


def _last_error(result, exit_code: int) -> str:
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and lines[-1].startswith("Error:"), result.stderr
    return lines[-1]


def test_the_results_file_takes_the_format_its_extension_names_unless_a_flag_says_otherwise(tmp_path, random_mirror):
    image = str(_photo(tmp_path / "a.png"))
    for name in ("results.csv", "out.json", "out.jsonl", "out.JSON", "results.txt"):
        assert _invoke("classify", image, "-k", "2", "-o", str(tmp_path / name)).exit_code == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert [row["rank"] for row in rows] == ["1", "2"] and rows[0]["model"] == "MixNet_S"
    as_json = json.loads((tmp_path / "out.json").read_text())
    assert len(as_json) == 1 and len(as_json[0]["predictions"]) == 2
    assert json.loads((tmp_path / "out.JSON").read_text()) == as_json
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == as_json
    assert (tmp_path / "results.txt").read_text().startswith(f"{image}  (MixNet_S)")  # an unknown one: the table
    # A flag wins over the extension, and stdout stays as it was.
    assert _invoke("classify", image, "-k", "2", "--jsonl", "-o", str(tmp_path / "forced.csv")).exit_code == 0
    assert [json.loads(line) for line in (tmp_path / "forced.csv").read_text().splitlines()] == as_json
    assert _invoke("classify", image, "-k", "2").stdout.startswith(f"{image}  (MixNet_S)")


@pytest.mark.parametrize("flags", [("--json", "--csv"), ("--format", "jsonl", "--json"), ("--csv", "--format", "table")])
def test_two_different_output_formats_are_a_usage_error(flags, tmp_path, random_mirror):
    line = _last_error(_invoke("classify", str(_photo(tmp_path / "a.png")), *flags), exit_code=2)
    assert "ask for different output formats: give one" in line
    if "table" in flags:  # there is no --table: the message names the option that asked for it
        assert "--format table" in line
    assert random_mirror.requests == []
    # The same format twice is no contradiction.
    assert _invoke("models", "--json", "--format", "json").exit_code == 0
    assert _last_error(_invoke("doctor", *flags), exit_code=2).startswith("Error: --")


def test_a_misspelt_model_gets_a_did_you_mean(tmp_path):
    for typed, meant in (("mixnetl", "MixNet_L"), ("mixnet_ss", "MixNet_S"), ("MixNetM", "MixNet_M")):
        line = _last_error(_invoke("classify", str(_photo(tmp_path / "a.png")), "-m", typed), exit_code=2)
        assert f"unknown model '{typed}': did you mean {meant}? choose one of S (MixNet_S)" in line
    assert "did you mean" not in _last_error(_invoke("classify", "x.png", "-m", "resnet50"), exit_code=2)


def test_cuda_is_taken_as_gpu(tmp_path, random_mirror):
    from mixnet_cli.engines.choice import check_device_name

    assert [check_device_name(name) for name in ("cuda", "CUDA:1", " cuda:0 ")] == ["gpu", "gpu:1", "gpu:0"]
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has a GPU")
    # No "unknown device": the GPU is looked for, and its absence named, as for --device gpu:1.
    image = str(_photo(tmp_path / "a.png"))
    gpu = _last_error(_invoke("classify", image, "--device", "gpu:1"), exit_code=1)
    assert _last_error(_invoke("classify", image, "--device", "cuda:1"), exit_code=1) == gpu
    assert "unknown device" not in gpu and "gpu" in gpu


def test_a_top_k_above_the_classes_gives_every_class_with_a_notice(tmp_path, random_mirror):
    result = _invoke("classify", str(_photo(tmp_path / "a.png")), "-k", "5000", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)[0]["predictions"]) == 1000
    notices = [line for line in result.stderr.splitlines() if "top-k" in line]
    assert notices == ["mixnet: top-k 5000 is more than the model's 1000 classes: giving all 1000"]


def test_a_first_run_says_it_downloads_and_verbose_says_where_the_weights_came_from(tmp_path, random_mirror):
    image = str(_photo(tmp_path / "a.png"))
    first = _invoke("classify", image, "-v")
    assert first.exit_code == 0, first.output
    size = (random_mirror.directory / "MixNet_S_pretrained.pdparams").stat().st_size
    assert (f"mixnet: downloading MixNet_S weights ({size / 1e6:.1f} MB) from "
            f"{random_mirror.url}/MixNet_S_pretrained.pdparams") in first.stderr.splitlines()
    assert "(downloaded now, sha256 " in first.stderr
    second = _invoke("classify", image, "-v")
    assert "downloading" not in second.stderr and "(found in the cache, sha256 " in second.stderr
    assert "downloading" not in _invoke("classify", image, "-q").stderr


def test_doctor_fits_80_columns_off_a_terminal_with_hints_on_their_own_line(isolated_home, monkeypatch):
    monkeypatch.setenv("MIXNET_MIRROR", "http://127.0.0.1:9")  # the discard port: the URL checks fail, with hints
    result = _invoke("doctor")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["check", "status", "value"]
    assert max(map(len, lines)) <= 80, max(lines, key=len)
    rows = json.loads(_invoke("doctor", "--json").stdout)
    for row in rows:  # every check is there, with its status beside it
        assert any(line.startswith(row["check"]) and row["status"] in line.split() for line in lines), row
    hints = [index for index, line in enumerate(lines) if line.lstrip().startswith("hint: ")]
    assert len(hints) == sum(1 for row in rows if row["hint"]) > 0
    column = lines[0].index("value")
    for index in hints:
        assert lines[index][:column].strip() == ""  # nothing else on a hint's line
    url_row = next(i for i, line in enumerate(lines) if line.startswith("MixNet_S URL"))
    words = " ".join(line.strip() for line in lines[url_row:url_row + 4])
    assert "hint: no network?" in words


def test_install_lines_name_where_this_copy_came_from():
    """PEP 610's direct_url.json, as pip writes it for each way of installing."""
    from mixnet_cli.base.third_party import install_command

    assert install_command("serve", direct_url={"url": "file:///src/mixnet%20cli", "dir_info": {}}) == \
        'pip install "/src/mixnet cli[serve]"'
    assert install_command("ray", direct_url={"url": "file:///src/mixnet-cli", "dir_info": {"editable": True}}) == \
        'pip install -e "/src/mixnet-cli[ray]"'
    assert install_command("serve", direct_url={"url": "https://example.org/mixnet-cli.git",
                                                "vcs_info": {"vcs": "git", "commit_id": "3fa2c1d"}}) == \
        'pip install "mixnet-cli[serve] @ git+https://example.org/mixnet-cli.git@3fa2c1d"'
    assert install_command("torch", direct_url={"url": "file:///tmp/mixnet_cli-0.1.0-py3-none-any.whl",
                                                "archive_info": {}}) == \
        'pip install "mixnet-cli[torch] @ file:///tmp/mixnet_cli-0.1.0-py3-none-any.whl"'
    assert install_command("serve") == 'pip install "mixnet-cli[serve]"'  # from an index: the index form
    assert install_command("serve", installed=False, checkout=Path("/src/co")) == 'pip install "/src/co[serve]"'
    both = install_command("serve", installed=False)
    assert '"/path/to/mixnet-cli[serve]"' in both and '"mixnet-cli[serve]" from an index' in both


def test_this_copys_install_line_and_doctors_torch_advice(isolated_home, monkeypatch):
    import importlib.metadata

    from mixnet_cli.base.third_party import install_hint

    direct = importlib.metadata.distribution("mixnet-cli").read_text("direct_url.json")
    if direct and '"dir_info"' in direct:  # a checkout, as the tests install it: its path, not the index form
        assert json.loads(direct)["url"].split("://", 1)[1] in install_hint("serve")
        assert 'mixnet-cli[serve]"' not in install_hint("serve")
    monkeypatch.setenv("MIXNET_OFFLINE", "1")
    checks = {row["check"]: row for row in json.loads(_invoke("doctor", "--json").stdout)}
    torch_hint = checks["engine torch"]["hint"]
    if checks["engine torch"]["value"] != "ready" and not Path("/dev/nvidiactl").exists():
        assert install_hint("torch") in torch_hint and "CUDA wheels" in torch_hint
        assert "ONNX Runtime (the default) is faster" in torch_hint
    for row in checks.values():
        assert 'install "mixnet-cli' not in row["hint"] or not direct or '"dir_info"' not in direct
