"""`mixnet serve` spoken to in the Open Inference Protocol v2 by Triton's own client (`tritonclient.http`): one real
server process on 127.0.0.1 for the module (MixNet_S, calibrated test weights from a local mirror), generated
photos, and `mixnet classify --json` on the same photos as the answer to match.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests
from PIL import Image

from test_serve import ServerProcess, _local, _metric, needs_serve

httpclient = pytest.importorskip("tritonclient.http", reason="the v2 tests speak through tritonclient[http] "
                                 "(the [test] extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402 (after the skip above)

MODEL = "MixNet_S"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from imagegen import scene

    directory = tmp_path_factory.mktemp("oip-photos")
    paths = []
    for index, (size, suffix) in enumerate([((320, 240), "jpg"), ((500, 375), "png"), ((240, 320), "jpg")]):
        path = directory / f"photo{index}.{suffix}"
        Image.fromarray(scene(np.random.default_rng(300 + index), *size)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("oip-home")


@pytest.fixture(scope="module")
def server(home: Path, calibrated_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(home, calibrated_server.url, tmp_path_factory.mktemp("oip-logs") / "serve.log",
                            "--model", "S", "--max-body-mb", "1", "--max-queue", "24", "--max-batch-size", "2",
                            "--no-access-log")
    try:
        process.wait_for("/readyz", 200)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Any:
    triton = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60)
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def expected(photos: list[Path], home: Path, server: ServerProcess) -> list[dict[str, Any]]:
    """What `mixnet classify --json -k 5` prints for the photos (run once, offline, with the weights the server
    downloaded)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        local = _local("classify", *map(str, photos), "--json", "-k", "5", home=home, monkeypatch=monkeypatch)
    assert local.exit_code == 0, local.output
    return json.loads(local.stdout)


def _images(photos: list[Path]) -> np.ndarray:
    return np.array([photo.read_bytes() for photo in photos], dtype=np.object_)


def _infer(client: Any, data: np.ndarray, binary: bool, class_count: int = 0) -> Any:
    image = httpclient.InferInput("image", [len(data)], "BYTES")
    image.set_data_from_numpy(data, binary_data=binary)
    output = httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=class_count)
    return client.infer(MODEL, [image], outputs=[output])


@needs_serve
def test_health_and_metadata_as_tritonclient_reads_them(server, client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.get_server_metadata()["extensions"] == ["classification", "binary_tensor_data",
                                                          "model_configuration"]
    assert client.get_model_metadata(MODEL) == {
        "name": MODEL, "platform": "mixnet-cli",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}],
    }
    # What perf_analyzer reads beside the metadata: the most images per request, and the service's batching.
    config = client.get_model_config(MODEL)
    assert config["max_batch_size"] == 24 and config["dynamic_batching"]["preferred_batch_size"] == [1, 2]
    assert [tensor["name"] for tensor in config["input"] + config["output"]] == ["image", "probabilities"]
    # Short names are /v1's; v2 names models in full, and a model not served is not ready.
    assert not client.is_model_ready("S") and not client.is_model_ready("MixNet_L")
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        response = server.get(path)
        assert response.status_code == 200 and response.content == b"", path
    unknown = server.get("/v2/models/MixNet_L")
    assert unknown.status_code == 404 and "served: MixNet_S" in unknown.json()["error"]
    assert {"/v2", "/v2/health/ready", "/v2/models/{name}/infer"} <= set(server.get("/openapi.json").json()["paths"])


@needs_serve
@pytest.mark.parametrize("binary", [True, False], ids=["binary-data", "json-base64"])
def test_classification_extension_top5_equals_local_classify(client, photos, expected, binary):
    data = _images(photos)
    if not binary:  # in JSON, an image file travels as base64 text
        data = np.array([base64.b64encode(item) for item in data], dtype=np.object_)
    rows = _infer(client, data, binary, class_count=5).as_numpy("probabilities")
    assert rows.shape == (len(photos), 5)
    for row, local in zip(rows, expected):
        answered = [(item.decode() if isinstance(item, bytes) else item).split(":", 2) for item in row]
        assert [(int(class_id), label) for _, class_id, label in answered] == [
            (p["class_id"], p["label"]) for p in local["predictions"]]
        # Images batched otherwise than locally move probabilities in the last float32 bits only.
        assert [float(score) for score, _, _ in answered] == pytest.approx(
            [p["score"] for p in local["predictions"]], rel=1e-5, abs=1e-7)


@needs_serve
@pytest.mark.parametrize("binary", [True, False], ids=["binary-data", "json"])
def test_probabilities_are_the_softmax_classify_ranks(client, photos, expected, binary):
    probabilities = _infer(client, _images(photos) if binary else np.array(
        [base64.b64encode(p.read_bytes()) for p in photos], dtype=np.object_), binary).as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(photos), 1000)
    assert probabilities.sum(axis=1) == pytest.approx(1.0, abs=1e-5)
    for row, local in zip(probabilities, expected):
        top = np.argsort(-row, kind="stable")[:5]
        assert top.tolist() == [p["class_id"] for p in local["predictions"]]
        assert row[top].tolist() == pytest.approx([p["score"] for p in local["predictions"]], rel=1e-5, abs=1e-7)


@needs_serve
def test_one_bad_image_fails_the_request_with_the_protocols_error(server, client, photos):
    before = server.get("/metrics").text
    with pytest.raises(InferenceServerException) as failed:
        _infer(client, np.array([photos[0].read_bytes(), b"not an image at all"], dtype=np.object_), True, 5)
    assert failed.value.status() == "422" and failed.value.message().startswith("image[1]: ")
    # The service keeps answering, and counts v2 requests by endpoint, not by model path.
    assert _infer(client, _images(photos[:1]), True, 1).as_numpy("probabilities").shape == (1, 1)
    after = server.get("/metrics").text
    label = {"endpoint": "/v2/models/{name}/infer"}
    assert _metric(after, "mixnet_http_requests_total", **label, status="422") == \
        _metric(before, "mixnet_http_requests_total", **label, status="422") + 1
    assert _metric(after, "mixnet_http_requests_total", **label, status="200") >= 1


@needs_serve
def test_requests_the_protocol_cannot_read_are_refused_with_the_error_object(server, photos):
    url = f"{server.url}/v2/models/{MODEL}/infer"
    image = base64.b64encode(photos[0].read_bytes()).decode()

    def infer(body: Any, **kwargs: Any) -> requests.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return requests.post(url, data=data, timeout=30, **kwargs)

    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}
    cases = [
        (b"{not json", 400, "not JSON"),
        ({"inputs": []}, 400, "exactly one tensor"),
        ({"inputs": [{**tensor, "name": "input_1"}]}, 400, "unknown input 'input_1'"),
        ({"inputs": [{**tensor, "datatype": "FP32"}]}, 400, "datatype BYTES"),
        ({"inputs": [{**tensor, "shape": [2]}]}, 400, "holds 1 elements"),
        ({"inputs": [{**tensor, "data": ["%%% not base64"]}]}, 400, "not base64"),
        ({"inputs": [tensor], "outputs": [{"name": "features"}]}, 400, "'features' is not offered"),
        ({"inputs": [tensor], "outputs": [{"name": "logits"}]}, 400, "unknown output 'logits'"),
        ({"inputs": [tensor], "outputs": [{"name": "probabilities", "parameters": {"classification": 1001}}]},
         400, "between 1 and 1000"),
        # A number no float holds, and nesting deeper than the parser recurses: 400s, never a 500.
        ({"inputs": [tensor], "parameters": {"timeout": 10 ** 400}}, 400, "parameters.timeout must be a whole"),
        (b'{"parameters": {"timeout": ' + b"9" * 5000 + b"}}", 400, "a number in its JSON has too many digits"),
        (b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),
    ]
    for body, status, words in cases:
        response = infer(body)
        assert response.status_code == status, (body, response.text)
        assert set(response.json()) == {"error"} and words in response.json()["error"], (body, response.text)
    # The binary-data extension: a length prefix that promises more than the body holds.
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    truncated = infer(header + (100).to_bytes(4, "little") + b"abcd",
                      headers={"Inference-Header-Content-Length": str(len(header))})
    assert truncated.status_code == 400 and "announces 100 bytes" in truncated.json()["error"]
    superscript = infer(header + b"abcd", headers={"Inference-Header-Content-Length": "\xb2"})  # "²".isdigit()
    assert superscript.status_code == 400 and "Inference-Header-Content-Length must" in superscript.json()["error"]
    too_large = infer({"inputs": [{**tensor, "data": [image] * 200, "shape": [200]}]})
    assert too_large.status_code == 413 and "limit" in too_large.json()["error"]
    for response, status in [(requests.get(url, timeout=30), 405), (server.get("/v2/models"), 404),
                             (infer({"inputs": [tensor]}, params={"topk": "1"}), 400),
                             (requests.post(f"{server.url}/v2/models/S/infer", json={"inputs": [tensor]},
                                            timeout=30), 404)]:
        assert response.status_code == status and set(response.json()) == {"error"}, response.text
    assert infer({"inputs": [tensor], "id": "42"}).json()["id"] == "42"


@needs_serve
def test_an_image_past_tritons_timeout_is_dropped_before_inference(server, photos):
    """Triton's ``timeout`` (microseconds, from the request's arrival): an image whose answer would come later
    is dropped from the model's queue before its forward pass, and the request is 504."""
    url = f"{server.url}/v2/models/{MODEL}/infer"
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1],
              "data": [base64.b64encode(photos[0].read_bytes()).decode()]}

    def counts() -> tuple[float, float]:
        text = server.get("/metrics").text
        return (_metric(text, "mixnet_images_dropped_total", model=MODEL),
                _metric(text, "mixnet_images_total", model=MODEL))

    before = counts()
    late = requests.post(url, json={"inputs": [tensor], "parameters": {"timeout": 1}}, timeout=30)
    assert late.status_code == 504 and "deadline of 1e-06 s" in late.json()["error"], late.text
    assert counts() == (before[0] + 1, before[1])  # dropped, never inferred
    on_time = requests.post(url, json={"inputs": [tensor], "parameters": {"timeout": 30_000_000}}, timeout=30)
    assert on_time.status_code == 200 and counts() == (before[0] + 1, before[1] + 1)


@needs_serve
def test_many_images_in_one_request_answer_each_in_its_place(client, photos):
    """Bodies and answers this large are read and written off the event loop (thresholds in oip.py)."""
    from mixnet_cli.service import oip

    order = [photos[index % len(photos)] for index in range(3 * oip._ENCODE_OFF_LOOP_IMAGES // 2)]
    data = np.array([base64.b64encode(photo.read_bytes()) for photo in order], dtype=np.object_)
    assert sum(len(item) for item in data) > oip._PARSE_OFF_LOOP_BYTES
    rows = _infer(client, data, False).as_numpy("probabilities")
    alone = {photo: _infer(client, data[i:i + 1], False).as_numpy("probabilities")[0]
             for i, photo in enumerate(order[:len(photos)])}
    assert rows.shape == (len(order), 1000)
    for photo, row in zip(order, rows):
        assert row == pytest.approx(alone[photo], rel=1e-4, abs=1e-6)


def test_the_request_forms_tritonclient_and_triton_habits_send():
    """Read in-process: shape [N, 1] with data nested per image, and binary tensors after the JSON."""
    from mixnet_cli.service.oip import ProtocolError, parse_infer_request

    files = [b"\xff\xd8first", b"\x89PNGsecond"]
    nested = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1],
                          "data": [[base64.b64encode(f).decode()] for f in files]}]}
    parsed = parse_infer_request(json.dumps(nested).encode(), None, 1000)
    assert parsed.images == files and parsed.outputs[0].binary is False and parsed.timeout_s is None
    tensor = b"".join(len(f).to_bytes(4, "little") + f for f in files)
    header = json.dumps({"id": "a", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                                "parameters": {"binary_data_size": len(tensor)}}],
                         "parameters": {"binary_data_output": True, "timeout": 2500}}).encode()
    parsed = parse_infer_request(header + tensor, str(len(header)), 1000)
    assert (parsed.id, parsed.images, parsed.outputs[0].binary, parsed.timeout_s) == ("a", files, True, 0.0025)
    for body, length, words in [(header + tensor + b"x", str(len(header)), "1 bytes of binary data follow"),
                                (header + tensor, str(len(header) + len(tensor) + 1), "byte length of the JSON"),
                                (header + tensor, None, f"{'Inference-Header-Content-Length'} header")]:
        with pytest.raises(ProtocolError, match=words) as refused:
            parse_infer_request(body, length, 1000)
        assert refused.value.status == 400
