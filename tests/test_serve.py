"""`mixnet serve` as a client meets it: a real server process on 127.0.0.1, a real HTTP client (requests).

Two servers per module, sharing one cache: the main one (MixNet_S and MixNet_L, JSON access log, a small body
limit) for answers, errors, batching and metrics; a tiny one (a queue of 2 and a long batch wait) for overload
and for SIGTERM with requests in flight. The weights are the calibrated test weights, served by a local mirror
that holds its answer until the test has seen ``/readyz`` say 503.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests
from click.testing import CliRunner
from PIL import Image

from mixnet_cli.cli import main
from mixnet_cli.service.serve import serve_missing

needs_serve = pytest.mark.skipif(serve_missing() is not None, reason=serve_missing() or "")
START_TIMEOUT_S = 240.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class GatedMirror:
    """A local HTTP server for the weights that answers only once ``open()`` is called (at most 60 s later)."""

    def __init__(self, directory: Path) -> None:
        self.gate = threading.Event()
        gate = self.gate

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                gate.wait(60)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(directory)))
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def open(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.gate.set()
        self._httpd.shutdown()
        self._httpd.server_close()


class ServerProcess:
    """``mixnet serve`` in a process of its own on a free port of 127.0.0.1; stderr kept in a file."""

    def __init__(self, home: Path, mirror: str, log: Path, *options: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIXNET_")}
        env.update(MIXNET_HOME=str(home), MIXNET_MIRROR=mirror, MIXNET_RETRIES="0")
        self._stderr = open(log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mixnet_cli", "serve", "--port", str(self.port), *options],
            env=env, stdout=subprocess.DEVNULL, stderr=self._stderr, stdin=subprocess.DEVNULL,
        )

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def post(self, query: str = "", **kwargs: Any) -> requests.Response:
        return requests.post(self.url + "/v1/classify" + query, timeout=60, **kwargs)

    def wait_for(self, path: str, status: int, timeout: float = START_TIMEOUT_S) -> requests.Response:
        """Poll ``path`` until it answers ``status``; fails with the server's stderr if it exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"mixnet serve exited with {self.process.returncode}: {self.stderr()}")
            try:
                response = requests.get(self.url + path, timeout=5)
                if response.status_code == status:
                    return response
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{path} did not answer {status} within {timeout:g} s: {self.stderr()}")
            time.sleep(0.05)

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._stderr.close()
        return self.process.returncode


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text`` (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        match = re.match(r"^([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)$", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(3))
    return 0.0


def _photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    from imagegen import scene

    Image.fromarray(scene(np.random.default_rng(seed), *size)).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("serve-photos")
    return [_photo(directory / f"photo{i}.jpg", size, seed=100 + i)
            for i, size in enumerate([(320, 240), (500, 375), (240, 320), (400, 400)])]


@pytest.fixture(scope="module")
def service_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-home")


@pytest.fixture(scope="module")
def mirror(calibrated_weights: Any) -> Iterator[GatedMirror]:
    calibrated_weights("MixNet_S")
    calibrated_weights("MixNet_L")
    server = GatedMirror(calibrated_weights.directory)
    yield server
    server.close()


@pytest.fixture(scope="module")
def service(service_home: Path, mirror: GatedMirror, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[ServerProcess, dict[str, int]]]:
    """The main server, started while the mirror holds the weights: ``seen`` has what /readyz and /v1/classify
    answered then, and what /readyz answered once the models were loaded."""
    if serve_missing() is not None:
        pytest.skip(serve_missing() or "")
    server = ServerProcess(service_home, mirror.url, tmp_path_factory.mktemp("serve-logs") / "main.log",
                           "--model", "S", "--model", "L", "--max-batch-size", "4", "--max-wait-ms", "20",
                           "--max-body-mb", "1", "--log-format", "json")
    try:
        server.wait_for("/healthz", 200)
        seen = {"readyz_loading": server.get("/readyz").status_code,
                "classify_loading": server.post(data=b"x").status_code}
        mirror.open()
        seen["readyz_loaded"] = server.wait_for("/readyz", 200).status_code
        yield server, seen
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny_service(service: Any, service_home: Path, mirror: GatedMirror, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[ServerProcess]:
    """A queue of 2 images and batches that wait 1.5 s for more: requests stay in flight long enough to watch.
    It also fetches image URLs (--allow-urls), from 127.0.0.1 too (--allow-private-urls)."""
    server = ServerProcess(service_home, mirror.url, tmp_path_factory.mktemp("serve-logs") / "tiny.log",
                           "--model", "S", "--max-batch-size", "4", "--max-wait-ms", "1500", "--max-queue", "2",
                           "--no-access-log", "--allow-urls", "--allow-private-urls")
    try:
        server.wait_for("/readyz", 200)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fine_tuned(calibrated_weights: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Your own MixNet_S fine-tuned on 7 classes (weightgen.make_fine_tuned_weights), and its label file in
    PaddleClas's class_id_map_file layout."""
    from weightgen import FINE_TUNED_CLASSES, make_fine_tuned_weights

    directory = tmp_path_factory.mktemp("fine-tuned")
    labels = directory / "flowers_label_list.txt"
    labels.write_text("".join(f"{i} {name}\n" for i, name in enumerate(FINE_TUNED_CLASSES)))
    return make_fine_tuned_weights(calibrated_weights("MixNet_S"), directory / "best_model.pdparams"), labels


@pytest.fixture(scope="module")
def custom_service(service_home: Path, mirror: GatedMirror, fine_tuned: tuple[Path, Path],
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of your own weights and labels (nothing to download: the mirror is never asked)."""
    if serve_missing() is not None:
        pytest.skip(serve_missing() or "")
    weights, labels = fine_tuned
    server = ServerProcess(service_home, mirror.url, tmp_path_factory.mktemp("serve-logs") / "custom.log",
                           "--weights", str(weights), "--labels", str(labels), "--no-access-log")
    try:
        server.wait_for("/readyz", 200)
        yield server
    finally:
        server.stop()


def _local(*args: str, home: Path, monkeypatch: pytest.MonkeyPatch, input: bytes | None = None) -> Any:
    monkeypatch.setenv("MIXNET_HOME", str(home))
    monkeypatch.setenv("MIXNET_OFFLINE", "1")
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


@needs_serve
def test_readyz_is_503_until_the_models_are_loaded(service):
    server, seen = service
    assert seen == {"readyz_loading": 503, "classify_loading": 503, "readyz_loaded": 200}
    assert server.get("/healthz").status_code == 200
    assert server.get("/readyz").json() == {"status": "ready", "models": ["MixNet_S", "MixNet_L"]}


@needs_serve
@pytest.mark.parametrize("model", ["S", "L"])
def test_answers_equal_local_classify_value_for_value(service, service_home, photos, model, monkeypatch):
    server, _ = service
    local = _local("classify", *map(str, photos), "--model", model, "-k", "3", "-b", "1", "--json",
                   home=service_home, monkeypatch=monkeypatch)
    assert local.exit_code == 0, local.output
    expected = json.loads(local.stdout)
    for photo, row in zip(photos, expected):
        response = server.post(f"?model={model}&topk=3", data=photo.read_bytes())
        assert response.status_code == 200, response.text
        assert response.json() == {**row, "input": "-"}
        multipart = server.post(f"?model={model}&topk=3", files=[("image", (str(photo), photo.read_bytes()))])
        assert multipart.status_code == 200 and multipart.json() == [row]
    assert {row["model"] for row in expected} == {f"MixNet_{model}"}


@needs_serve
def test_several_images_in_one_request_answer_a_list_in_request_order(service, photos):
    server, _ = service
    order = [photos[2], photos[0], photos[3], photos[1]]
    response = server.post("?topk=2", files=[("image", (p.name, p.read_bytes())) for p in order])
    assert response.status_code == 200
    rows = response.json()
    assert [row["input"] for row in rows] == [p.name for p in order]
    for photo, row in zip(order, rows):
        alone = server.post("?topk=2", files=[("image", (photo.name, photo.read_bytes()))]).json()[0]
        assert [p["class_id"] for p in row["predictions"]] == [p["class_id"] for p in alone["predictions"]]
        assert [p["score"] for p in row["predictions"]] == pytest.approx(
            [p["score"] for p in alone["predictions"]], rel=1e-4, abs=1e-6)


@needs_serve
def test_concurrent_requests_run_as_one_batch(service, photos):
    server, _ = service
    before = server.get("/metrics").text
    bodies = [p.read_bytes() for p in photos] * 2
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        statuses = list(pool.map(lambda body: server.post(data=body).status_code, bodies))
    assert statuses == [200] * len(bodies)
    after = server.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return _metric(after, name, model="MixNet_S", **labels) - _metric(before, name, model="MixNet_S", **labels)

    assert delta("mixnet_batch_size_sum") == len(bodies)
    batches, single = delta("mixnet_batch_size_count"), delta("mixnet_batch_size_bucket", le="1.0")
    assert batches - single >= 1, f"no batch of more than one image among {batches:g} batches"
    assert batches < len(bodies)
    assert _metric(after, "mixnet_http_requests_total", endpoint="/v1/classify", status="200") >= len(bodies)
    assert _metric(after, "mixnet_http_request_duration_seconds_count", endpoint="/v1/classify") >= len(bodies)
    assert _metric(after, "mixnet_queue_depth", model="MixNet_S") == 0
    assert _metric(after, "mixnet_images_per_second") > 0
    assert "mixnet_images_total" in after


@needs_serve
def test_bad_parameters_are_400_with_the_clis_message(service, photos, service_home, monkeypatch):
    from mixnet_cli.base.errors import UnknownModelError
    from mixnet_cli.base.manifest import resolve_model

    server, _ = service
    body = photos[0].read_bytes()
    with pytest.raises(UnknownModelError) as unknown:
        resolve_model("XL")
    response = server.post("?model=XL", data=body)
    assert response.status_code == 400
    assert response.json() == {"error": {"type": "UnknownModelError", "message": str(unknown.value)}}
    cli = _local("classify", str(photos[0]), "--model", "XL", home=service_home, monkeypatch=monkeypatch)
    assert str(unknown.value) in cli.stderr
    for query, words in [("?model=M", "not served here"), ("?topk=0", "top-k must be between 1 and 1000"),
                         ("?topk=5000", "top-k must be between 1 and 1000"),
                         ("?topk=three", "topk must be a whole number"), ("?deadline_ms=0", "deadline_ms"),
                         # what int() takes or chokes on: the parameter is named, never a 500
                         ("?deadline_ms=" + "9" * 400, "deadline_ms must be a whole number from 1"),
                         ("?deadline_ms=%D9%A3", "deadline_ms"), ("?deadline_ms=1_000", "deadline_ms"),
                         ("?topk=%C2%B2", "topk must be a whole number"), ("?cam_class=" + "9" * 4301, "cam_class"),
                         ("?url=https://127.0.0.1:9/cat.jpg", "--allow-urls")]:
        response = server.post(query, data=body)
        assert response.status_code == 400, query
        assert words in response.json()["error"]["message"], query
    empty = server.post(data=b"")
    assert empty.status_code == 400 and "empty request" in empty.json()["error"]["message"]
    no_image_field = server.post(files=[("photo", ("a.jpg", body))])
    assert no_image_field.status_code == 400 and "'image'" in no_image_field.json()["error"]["message"]


@needs_serve
def test_a_path_or_method_the_service_lacks_answers_the_json_error_object(service):
    server, _ = service
    get = server.get("/v1/classify")
    assert get.status_code == 405 and get.headers["content-type"] == "application/json"
    assert get.headers["allow"] == "POST"
    assert get.json() == {"error": {"type": "MethodNotAllowed",
                                    "message": "GET is not allowed on /v1/classify; use POST"}}
    post = requests.post(server.url + "/healthz", timeout=30)
    assert post.status_code == 405 and post.json()["error"]["message"].startswith("POST is not allowed on /healthz")
    # No redirect to a Location made of the client's Host header for a trailing slash: the JSON 404.
    for method, path in (("GET", "/v1/limits/"), ("POST", "/v1/classify/")):
        slash = requests.request(method, server.url + path, headers={"Host": "evil.example"}, allow_redirects=False,
                                 timeout=30)
        assert slash.status_code == 404 and slash.json()["error"]["type"] == "NotFound", (path, slash.headers)
    missing = server.get("/v1/predict")  # (under /v2, the Open Inference Protocol's own error: tests/test_oip.py)
    assert missing.status_code == 404 and missing.json() == {"error": {"type": "NotFound", "message": (
        "no endpoint /v1/predict; this service answers POST /v1/classify and GET /healthz, /readyz, /metrics, "
        "/openapi.json, /v1/limits")}}


@needs_serve
def test_not_an_image_is_422_with_the_clis_error_object(service, service_home, photos, monkeypatch):
    server, _ = service
    text = b"not an image at all\n"
    local = _local("classify", "-", "--json", home=service_home, monkeypatch=monkeypatch, input=text)
    assert local.exit_code == 1
    response = server.post(data=text)
    assert response.status_code == 422
    assert response.json() == json.loads(local.stdout)[0]
    mixed = server.post(files=[("image", ("good.jpg", photos[0].read_bytes())), ("image", ("notes.jpg", text))])
    assert mixed.status_code == 422
    good, bad = mixed.json()
    assert "predictions" in good and bad["error"]["type"] == "NotAnImageError" and bad["input"] == "notes.jpg"


@needs_serve
def test_no_request_reads_a_local_path(service, photos):
    server, _ = service
    # The path of a real image, as the body or as a part's file name: only the bytes sent are decoded.
    as_body = server.post(data=str(photos[0].resolve()).encode())
    assert as_body.status_code == 422 and as_body.json()["error"]["type"] == "NotAnImageError"
    as_name = server.post(files=[("image", (str(photos[0].resolve()), b"GIF89a garbage"))])
    assert as_name.status_code == 422
    for url in (f"file://{photos[0].resolve()}", str(photos[0].resolve())):
        response = server.post("?" + requests.compat.urlencode({"url": url}), data=b"")
        assert response.status_code == 400


@needs_serve
def test_body_over_the_limit_is_413_and_a_decompression_bomb_too(service, tmp_path):
    from imagegen import png_header_only

    server, _ = service
    response = server.post(data=b"\0" * (1024 * 1024 + 1))
    assert response.status_code == 413 and response.json()["error"]["type"] == "RequestTooLarge"
    bomb = png_header_only(tmp_path / "bomb.png", 20_000, 10_000).read_bytes()
    response = server.post(data=bomb)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "ImageTooLargeError"
    assert "decompression bomb" in response.json()["error"]["message"]


@needs_serve
def test_a_request_past_its_deadline_is_504(service, tmp_path):
    server, _ = service
    big = _photo(tmp_path / "big.png", (3000, 2000), seed=7).read_bytes()  # a PNG that takes a while to decode
    response = server.post("?deadline_ms=5", data=big)
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "DeadlineExceeded"
    assert server.post(data=big).status_code == 200  # the service's own deadline is long enough
    assert _metric(server.get("/metrics").text, "mixnet_queue_depth", model="MixNet_S") == 0


@needs_serve
def test_openapi_and_the_json_access_log(service):
    server, _ = service
    document = server.get("/openapi.json").json()
    assert document["openapi"].startswith("3.") and "/v1/classify" in document["paths"]
    assert {"/healthz", "/readyz", "/metrics"} <= set(document["paths"])
    lines = [json.loads(line) for line in server.stderr().splitlines() if line.startswith("{")]
    classify = [line for line in lines if line["path"] == "/v1/classify" and line["status"] == 200]
    assert classify and {"time", "client", "method", "status", "duration_ms", "model", "images"} <= set(classify[0])
    assert classify[0]["client"] == "127.0.0.1" and classify[0]["method"] == "POST"


@needs_serve
def test_classify_through_the_server_prints_what_a_local_run_prints(service, service_home, photos, tmp_path,
                                                                    monkeypatch):
    server, _ = service
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image\n")
    arguments = [str(photos[0]), str(notes), str(tmp_path / "missing.jpg"), str(photos[1]), "-k", "3", "-b", "1"]
    local = _local("classify", *arguments, "--json", home=service_home, monkeypatch=monkeypatch)
    remote = _local("classify", *arguments, "--json", "--server", server.url, home=service_home,
                    monkeypatch=monkeypatch)
    assert remote.exit_code == local.exit_code == 1
    assert remote.stderr == local.stderr
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    unknown = _local("classify", str(photos[0]), "--server", f"http://127.0.0.1:{_free_port()}",
                     home=service_home, monkeypatch=monkeypatch)
    assert unknown.exit_code == 1 and "cannot reach the service" in unknown.stderr


@needs_serve
def test_image_urls_are_fetched_only_when_allowed(tiny_service, service, photos, file_server):
    main_server, _ = service
    host = file_server(photos[0].parent)
    url = f"{host.url}/{photos[0].name}"
    fetched = tiny_service.post("?" + requests.compat.urlencode({"url": url, "topk": 3}))
    assert fetched.status_code == 200, fetched.text
    assert fetched.json() == {**main_server.post("?topk=3", data=photos[0].read_bytes()).json(), "input": url}
    missing = tiny_service.post("?" + requests.compat.urlencode({"url": f"{host.url}/missing.jpg"}))
    assert missing.status_code == 422 and missing.json()["error"]["type"] == "ImageDownloadError"
    assert host.requests == [f"/{photos[0].name}", "/missing.jpg"]
    refused = main_server.post("?" + requests.compat.urlencode({"url": url}))
    assert refused.status_code == 400 and len(host.requests) == 2


@needs_serve
def test_a_full_queue_is_503_with_retry_after_at_once(tiny_service, photos):
    body = photos[0].read_bytes()

    def post() -> tuple[int, str | None, float]:
        started = time.monotonic()
        response = tiny_service.post(data=body)
        return response.status_code, response.headers.get("Retry-After"), time.monotonic() - started

    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda _: post(), range(10)))
    refused = [answer for answer in answers if answer[0] == 503]
    assert len(refused) >= 6 and {answer[0] for answer in answers} <= {200, 503}
    # The admitted ones wait 1.5 s for their batch; the refused are answered well before that.
    assert all(retry_after == "1" and elapsed < 1.2 for _, retry_after, elapsed in refused), refused
    assert _metric(tiny_service.get("/metrics").text, "mixnet_http_requests_total", endpoint="/v1/classify",
                   status="503") == len(refused)


@needs_serve
def test_sigterm_finishes_the_requests_in_flight_and_exits_0(tiny_service, photos):
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = [pool.submit(tiny_service.post, data=photo.read_bytes()) for photo in photos[:2]]
        deadline = time.monotonic() + 30
        while _metric(tiny_service.get("/metrics").text, "mixnet_queue_depth", model="MixNet_S") < 2:
            assert time.monotonic() < deadline, "the requests never reached the queue"
            time.sleep(0.02)
        tiny_service.process.send_signal(signal.SIGTERM)
        responses = [answer.result(timeout=60) for answer in answers]
    assert [response.status_code for response in responses] == [200, 200]
    assert all(response.json()["predictions"] for response in responses)
    assert tiny_service.process.wait(timeout=60) == 0, tiny_service.stderr()
    with pytest.raises(requests.ConnectionError):
        requests.get(tiny_service.url + "/healthz", timeout=5)


@needs_serve
@pytest.mark.slow
def test_sigterm_drains_with_paddle_loaded_too(service, service_home, mirror, photos, tmp_path):
    """Paddle's core installs its own C handler of SIGTERM when it loads (a stack dump, exit 143): the service
    puts its own back, so a paddle engine stops as the others do."""
    from mixnet_cli.base.third_party import paddle_missing

    if paddle_missing() is not None:
        pytest.skip(paddle_missing() or "")
    server = ServerProcess(service_home, mirror.url, tmp_path / "paddle.log", "--model", "S", "--engine", "paddle",
                           "--max-batch-size", "1")
    try:
        server.wait_for("/readyz", 200)
        assert server.post(data=photos[0].read_bytes()).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.stderr()
        assert "Termination signal" not in server.stderr() and "stopped" in server.stderr(), server.stderr()
    finally:
        server.stop()


@needs_serve
def test_own_weights_are_served_with_their_labels_and_answer_as_local_classify(custom_service, fine_tuned,
                                                                              service_home, photos, monkeypatch):
    from weightgen import FINE_TUNED_CLASSES

    server = custom_service
    weights, labels = fine_tuned
    assert server.get("/healthz").status_code == 200
    # Named as classify names it: the architecture read from the file.
    assert server.get("/readyz").json() == {"status": "ready", "models": ["MixNet_S"]}
    local = _local("classify", *map(str, photos), "--weights", str(weights), "--labels", str(labels), "-b", "1",
                   "--json", home=service_home, monkeypatch=monkeypatch)
    assert local.exit_code == 0, local.output
    expected = json.loads(local.stdout)
    for photo, row in zip(photos, expected):
        assert len(row["predictions"]) == 5
        assert all(p["label"] == FINE_TUNED_CLASSES[p["class_id"]] for p in row["predictions"])
        assert row["model"] != "MixNet_S"  # your weights' own name (file stem and sha256's first digits)
        # the default, selected by the architecture's name, and by the name the answers carry
        for query in ("", "?model=MixNet_S", "?model=s&topk=5", f"?model={row['model']}"):
            response = server.post(query, data=photo.read_bytes())
            assert response.status_code == 200, response.text
            assert response.json() == {**row, "input": "-"}, query
    assert len({row["predictions"][0]["class_id"] for row in expected}) > 1, "the photos should get different answers"

    every = server.post("?topk=7", data=photos[0].read_bytes()).json()
    assert sorted(p["class_id"] for p in every["predictions"]) == list(range(7))
    for query, words in [("?topk=8", "top-k must be between 1 and 7"),
                         ("?model=L", "model MixNet_L is not served here; this service serves your own weights "
                                      "alone, as MixNet_S")]:
        response = server.post(query, data=photos[0].read_bytes())
        assert response.status_code == 400 and words in response.json()["error"]["message"], query
    # classify --server takes the service's default: these weights, answering as a local run with them.
    remote = _local("classify", *map(str, photos), "--server", server.url, "-b", "1", "--json",
                    home=service_home, monkeypatch=monkeypatch)
    assert remote.exit_code == 0, remote.output
    assert json.loads(remote.stdout) == expected
    metrics = server.get("/metrics").text
    assert _metric(metrics, "mixnet_images_total", model="MixNet_S") >= 3 * len(photos) + 1
    assert _metric(metrics, "mixnet_ready") == 1
    document = server.get("/openapi.json").json()
    schema = document["paths"]["/v1/classify"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["oneOf"][0]["properties"]["predictions"]["items"]["properties"]["class_id"]["maximum"] == 6
    assert "7 classes" in document["info"]["description"]


@needs_serve
def test_own_weights_that_cannot_be_served_are_one_line_before_anything_loads(fine_tuned, random_mirror, tmp_path,
                                                                              isolated_home):
    weights, _ = fine_tuned
    six = tmp_path / "six.txt"
    six.write_text("a\nb\nc\nd\ne\nf\n")
    for arguments, code, words in [
        (["--weights", str(weights), "-m", "S", "-m", "L"], 2, "is served alone: give at most one --model"),
        (["--weights", str(weights), "-m", "all"], 2, "is served alone"),
        (["--weights", str(tmp_path / "missing.pdparams")], 2, "missing.pdparams: no such file"),
        (["--weights", str(weights), "--labels", str(six)], 2, "names 6 classes, but the weights have 7"),
        (["--labels", str(six)], 2, "names 6 classes, but MixNet_S's released weights have 1000"),
        (["--weights", str(weights), "-m", "L"], 1, "does not hold MixNet_L"),
    ]:
        result = CliRunner().invoke(main, ["serve", "--port", "0", *arguments], catch_exceptions=False)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == code, (arguments, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], (arguments, lines)
    assert random_mirror.requests == []
    assert not (isolated_home / "onnx").exists(), "nothing was converted"


def test_serve_without_the_extra_says_what_to_install(monkeypatch):
    import mixnet_cli.base.third_party as third_party

    installed = third_party.module_installed
    monkeypatch.setattr(third_party, "module_installed", lambda name: name != "uvicorn" and installed(name))
    result = CliRunner().invoke(main, ["serve"], catch_exceptions=False)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    # The install line that works from where this copy came (a checkout here), not an index it is not on.
    assert len(lines) == 1 and third_party.install_hint("serve") in lines[0] and "uvicorn" in lines[0]


def test_the_batcher_batches_on_its_ladder_and_bounds_its_queue():
    from concurrent.futures import ThreadPoolExecutor as Pool

    from mixnet_cli.service.batching import DynamicBatcher, batch_ladder
    from mixnet_cli.base.errors import Overloaded

    assert batch_ladder(8) == [1, 2, 4, 8] and batch_ladder(6) == [1, 2, 4, 6] and batch_ladder(1) == [1]
    sizes: list[int] = []

    async def scenario() -> list[np.ndarray]:
        with Pool(max_workers=1) as pool:
            batcher = DynamicBatcher(lambda arrays: np.stack(arrays) * 2, pool, max_batch_size=4, max_wait_s=0.05,
                                     max_queue=7, on_batch=lambda size, seconds: sizes.append(size))
            batcher.start()
            batcher.admit(7)
            with pytest.raises(Overloaded):
                batcher.admit(1)
            results = await asyncio.gather(*(batcher.submit(np.full(3, i, dtype=np.float32)) for i in range(7)))
            batcher.release(7)
            batcher.admit(1)  # room again
            batcher.release(1)
            await batcher.close()
            return results

    results = asyncio.run(scenario())
    assert [float(row[0]) for row in results] == [2.0 * i for i in range(7)]
    assert sorted(sizes, reverse=True) == [4, 2, 1]


@needs_serve
def test_an_address_in_use_is_a_one_line_error_before_anything_loads(random_mirror):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--port", str(port)], catch_exceptions=False)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: cannot listen on 127.0.0.1:{port} (Address already in use); choose " \
                                    "another --port or --host"
    assert random_mirror.requests == []


@needs_serve
def test_a_model_that_cannot_load_stops_the_service_with_its_error():
    result = CliRunner().invoke(main, ["serve", "--port", "0", "--offline"], catch_exceptions=False)
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: MixNet_S weights are not in the cache") and "offline" in last


def test_the_listening_socket_is_tcp_without_nagle():
    from mixnet_cli.service.serve import listen

    listener = listen("127.0.0.1", 0)
    try:
        # asyncio turns Nagle's algorithm off on accepted connections only when the socket says it is TCP.
        assert listener.proto == socket.IPPROTO_TCP
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        listener.close()


def test_server_mode_refuses_the_options_that_work_only_locally(tmp_path, random_mirror):
    photo = _photo(tmp_path / "a.jpg", (64, 48), seed=1)
    result = CliRunner().invoke(main, ["classify", str(photo), "--server", "http://127.0.0.1:9", "--embed", "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 2
    assert "--server classifies with the service's own models" in result.stderr
    own = CliRunner().invoke(main, ["classify", str(photo), "--server", "http://127.0.0.1:9", "--weights", str(photo)],
                             catch_exceptions=False)
    assert own.exit_code == 2 and "start it with `mixnet serve --weights FILE --labels FILE`" in own.stderr
    assert random_mirror.requests == []
