"""`mixnet classify --server URL`, the thin client: against a real `mixnet serve` on 127.0.0.1, it prints byte for
byte what a local run prints, and its process never imports numpy, OpenCV, Pillow, requests or an engine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from mixnet_cli.cli import main
from mixnet_cli.service.serve import serve_missing

pytestmark = pytest.mark.skipif(serve_missing() is not None, reason=serve_missing() or "")
ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("numpy", "cv2", "PIL", "onnxruntime", "openvino", "torch", "paddle", "requests", "urllib3")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def client_home(calibrated_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("remote-home")
    (home / "weights").mkdir()
    shutil.copyfile(calibrated_weights_dir / "MixNet_S_pretrained.pdparams",
                    home / "weights" / "MixNet_S_pretrained.pdparams")
    return home


@contextlib.contextmanager
def _service(home: Path, log: Path, *options: str) -> Iterator[str]:
    """A warm `mixnet serve` of MixNet_S with ``options`` on a free port of 127.0.0.1 (offline: the weights are in
    ``home``), stopped after."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXNET_")}
    env.update(MIXNET_HOME=str(home), MIXNET_OFFLINE="1", PYTHONPATH=str(ROOT))
    with open(log, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "mixnet_cli", "serve", "--port", str(port), *options],
                                   env=env, stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mixnet serve did not start: {log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def service_url(client_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A warm `mixnet serve` of MixNet_S on a free port of 127.0.0.1 (offline: the weights are in the cache)."""
    with _service(client_home, tmp_path_factory.mktemp("remote-logs") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def inputs(test_images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of photos, one with quotes, a space and an accent in its name, and a file that is no image."""
    folder = tmp_path_factory.mktemp("remote-inputs")
    photos = [path for kind, path in sorted(test_images.items()) if path.suffix.lower() in (".jpg", ".png")][:3]
    for index, photo in enumerate(photos):
        shutil.copyfile(photo, folder / f"photo{index}{photo.suffix}")
    shutil.copyfile(photos[0], folder / 'a "quoted" näme.jpg')
    (folder / "notes.jpg").write_text("not an image\n")
    return folder


@pytest.mark.parametrize("output", [[], ["--json"], ["--csv"], ["--jsonl", "-k", "2"],
                                    ["--csv", "-k", "5000"]])  # more than the classes: all, with the notice
def test_the_client_prints_byte_for_byte_what_a_local_run_prints(output, service_url, client_home, inputs,
                                                                  monkeypatch):
    monkeypatch.setenv("MIXNET_HOME", str(client_home))
    monkeypatch.setenv("MIXNET_OFFLINE", "1")
    arguments = ["classify", str(inputs), str(inputs / "missing.jpg"), "-b", "2", *output]
    local = CliRunner().invoke(main, arguments)
    remote = CliRunner().invoke(main, [*arguments, "--server", service_url])
    assert local.exit_code == remote.exit_code == 1  # the file that is no image, the missing one
    assert remote.stdout == local.stdout
    assert remote.stderr == local.stderr
    assert "quoted" in local.stdout and "näme" in local.stdout  # as each format quotes it


def test_the_client_process_imports_no_numpy_image_library_engine_or_requests(service_url, inputs, tmp_path):
    # The program as a user runs it, in a fresh process; what it imported is reported by an exit handler.
    report = tmp_path / "modules.txt"
    code = f"""
import atexit, sys

def report():
    heavy = {HEAVY!r}
    loaded = sorted({{name.split(".")[0] for name in sys.modules}} & set(heavy))
    open({str(report)!r}, "w").write(" ".join(loaded) + "\\n")

atexit.register(report)
sys.argv = ["mixnet", "classify", {str(inputs / "photo0.jpg")!r}, "--json", "--server", {service_url!r}]
from mixnet_cli.cli import main
main()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXNET_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": str(ROOT), "MIXNET_HOME": str(tmp_path / "empty-home")})
    assert done.returncode == 0, done.stderr
    assert '"predictions"' in done.stdout
    assert report.read_text() == "\n", f"imported: {report.read_text()}"
    assert not (tmp_path / "empty-home").exists()  # the client needs no cache


def test_an_engine_or_device_named_with_server_is_still_checked(service_url, inputs):
    result = CliRunner().invoke(main, ["classify", str(inputs / "photo0.jpg"), "--server", service_url,
                                       "--engine", "nope"])
    assert result.exit_code == 2 and "nope" in result.stderr


@pytest.mark.parametrize("limits", [b'{"max_images_per_request": "many"}', b'{"max_body_bytes": -1}',
                                    b'{"num_classes": {"MixNet_S": 1e400}}', b'[1, 2]', b'not json'])
def test_limits_that_are_not_mixnet_serves_are_one_line(limits, inputs):
    """A server at --server that answers /v1/limits with numbers `mixnet serve` never writes: one line, exit 1."""
    import http.server
    import threading

    class Odd(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(limits)))
            self.end_headers()
            self.wfile.write(limits)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Odd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = CliRunner().invoke(main, ["classify", str(inputs), "--server",
                                           f"http://127.0.0.1:{server.server_address[1]}"])
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is not its JSON; is it `mixnet serve`?" in lines[0], result.stderr


def test_an_image_over_the_services_body_limit_is_its_own_error_row(client_home, inputs, tmp_path, monkeypatch):
    """One image bigger than a request may be (the service's --max-body-mb): that image's error row, naming it and
    what to do, and the other images answered; before, the whole run failed ("cannot reach the service", or the
    413 of the batch) and printed nothing."""
    import numpy as np
    from PIL import Image

    noise = tmp_path / "noise.png"  # a real image of about 1.5 MB, over a 1 MB limit
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (720, 720, 3), dtype=np.uint8)).save(noise)
    assert noise.stat().st_size > 1_100_000
    monkeypatch.setenv("MIXNET_HOME", str(client_home))
    monkeypatch.setenv("MIXNET_OFFLINE", "1")
    arguments = ["classify", str(inputs / "photo0.jpg"), str(noise), str(inputs / "photo1.jpg"), "--jsonl"]
    local = CliRunner().invoke(main, arguments)
    with _service(client_home, tmp_path / "serve.log", "--max-body-mb", "1") as url:
        remote = CliRunner().invoke(main, [*arguments, "--server", url])
    assert remote.exit_code == 1, remote.output  # some images failed
    rows = [json.loads(line) for line in remote.stdout.splitlines()]
    assert [row["input"] for row in rows] == [str(inputs / "photo0.jpg"), str(noise), str(inputs / "photo1.jpg")]
    assert rows[1]["error"]["message"].startswith(f"{noise}: ") and "--max-body-mb" in rows[1]["error"]["message"]
    expected = [json.loads(line) for line in local.stdout.splitlines()]
    assert rows[0] == expected[0] and rows[2] == expected[2]
    [line] = [line for line in remote.stderr.splitlines() if str(noise) in line]
    assert "classify it locally" in line and "cannot reach" not in remote.stderr
