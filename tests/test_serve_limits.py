"""`mixnet serve` held against slow, idle, flooding, hostile and departing clients: a real server process on
127.0.0.1 with a token, real sockets that drip, flood, hang up and name private URLs.

One server for the module (MixNet_S, a queue of 4, a 2 s header timeout and keep-alive, a token, URLs from public
addresses only, JSON access log); the SIGTERM test stops it, so it runs last. The batcher, the pixel budget and
the URL fetcher are also tested in process, where their timing can be seen exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import re
import selectors
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests
from click.testing import CliRunner

from mixnet_cli.cli import main
from mixnet_cli.service.serve import serve_missing
from test_serve import GatedMirror, ServerProcess, _metric, _photo

needs_serve = pytest.mark.skipif(serve_missing() is not None, reason=serve_missing() or "")
TOKEN = "s3cret-token-for-tests"
HEADER_TIMEOUT_S = 2.0
DRIP_SECONDS = 25
GRACEFUL_TIMEOUT_S = 4  # the requests in flight at SIGTERM are answered within 2 s of it (2 s before this ends)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("limits-photos")
    return [_photo(directory / f"photo{i}.jpg", (320, 240), seed=300 + i) for i in range(6)]


@pytest.fixture(scope="module")
def mirror(calibrated_weights: Any) -> Iterator[GatedMirror]:
    if serve_missing() is not None:
        pytest.skip(serve_missing() or "")
    calibrated_weights("MixNet_S")
    server = GatedMirror(calibrated_weights.directory)
    server.open()
    yield server
    server.close()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's servers share one cache: the second finds the model downloaded and converted."""
    return tmp_path_factory.mktemp("limits-home")


@pytest.fixture(scope="module")
def guarded(mirror: GatedMirror, home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("limits")
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    server = ServerProcess(home, mirror.url, directory / "server.log",
                           "--model", "S", "--max-queue", "4", "--header-timeout", str(HEADER_TIMEOUT_S),
                           "--keep-alive", "2", "--token-file", str(token_file), "--allow-urls",
                           "--log-format", "json", "--graceful-timeout", str(GRACEFUL_TIMEOUT_S),
                           "--workers", "2")  # two decode threads: only the pixel budget keeps huge images apart
    try:
        server.wait_for("/readyz", 200)
        yield server
    finally:
        server.stop()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _post(server: ServerProcess, query: str = "", **kwargs: Any) -> requests.Response:
    return requests.post(server.url + "/v1/classify" + query, headers=AUTH, timeout=60, **kwargs)


def _metrics(server: ServerProcess) -> str:
    return server.get("/metrics", headers=AUTH).text


def _log_lines(server: ServerProcess, status: int) -> int:
    """The access log's JSON lines of /v1/classify answered ``status`` (every other line must be JSON too)."""
    lines = server.log.read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    return sum(1 for entry in entries if entry["path"] == "/v1/classify" and entry["status"] == status)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (reads what it sends until then)."""
    sock.settimeout(seconds)
    ends = time.monotonic() + seconds
    try:
        while time.monotonic() < ends:
            if not sock.recv(65536):
                return True
    except (socket.timeout, TimeoutError):
        return False
    except OSError:
        return True
    return False


class Drippers:
    """``count`` sockets, each sending a request line and then one header byte every ``every`` seconds, never
    finishing; a socket the server closes is replaced at once, so the pressure stays for ``seconds``."""

    def __init__(self, port: int, count: int, every: float = 0.5) -> None:
        self.port, self.count, self.every = port, count, every
        self.closed_by_server = 0
        self.connected = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Drippers":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _open(self, selector: selectors.BaseSelector) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setblocking(False)
        sock.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        selector.register(sock, selectors.EVENT_READ)
        self.connected += 1

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for _ in range(self.count):
            self._open(selector)
        next_drip = time.monotonic() + self.every
        while not self._stop.is_set():
            for key, _ in selector.select(timeout=0.05):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(sock)
                    sock.close()  # type: ignore[union-attr]
                    self.closed_by_server += 1
                    self._open(selector)
            if time.monotonic() >= next_drip:
                next_drip += self.every
                for key in list(selector.get_map().values()):
                    try:
                        key.fileobj.send(b"X")  # type: ignore[union-attr]
                    except OSError:
                        pass
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()


@needs_serve
@pytest.mark.slow
def test_slow_and_idle_clients_cannot_starve_others(guarded, photos):
    """300 header-dripping sockets, held (and replaced when closed) for 25 s, the attack that took the service
    down before: with a 2 s header timeout, 8 to 12 generations of them."""
    body = photos[0].read_bytes()
    before = _metrics(guarded)
    idle = socket.create_connection(("127.0.0.1", guarded.port))  # never sends a byte
    kept_alive = socket.create_connection(("127.0.0.1", guarded.port))
    kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    slow_body = socket.create_connection(("127.0.0.1", guarded.port))
    slow_body.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                      "Content-Length: 100000\r\n\r\n".encode())
    answers: list[tuple[str, int, float]] = []
    with Drippers(guarded.port, 300) as drippers:
        ends = time.monotonic() + DRIP_SECONDS
        while time.monotonic() < ends:
            for path, call in (("/healthz", lambda: requests.get(guarded.url + "/healthz", timeout=10)),
                               ("photo", lambda: _post(guarded, data=body))):
                started = time.monotonic()
                try:
                    status = call().status_code
                except requests.RequestException as exc:
                    status = -1
                    print(exc)
                answers.append((path, status, time.monotonic() - started))
            try:
                slow_body.send(b"x")  # one byte a round: far below the minimum rate
            except OSError:
                pass
            time.sleep(0.3)
        # Closed and replaced all along (each generation lives 2-3 s: the check runs every second).
        assert drippers.closed_by_server >= 300 * 5, drippers.closed_by_server
    assert answers and all(status == 200 and elapsed < 5 for _, status, elapsed in answers), \
        [answer for answer in answers if answer[1] != 200 or answer[2] >= 5]
    assert {path for path, _, _ in answers} == {"/healthz", "photo"}
    assert _closed_within(idle, 0.5), "a connection that sent nothing is closed after the header timeout"
    assert _closed_within(kept_alive, 0.5), "an idle keep-alive connection is closed after --keep-alive"
    assert _closed_within(slow_body, 0.5), "a body slower than the minimum rate is closed"
    after = _metrics(guarded)
    closed = _metric(after, "mixnet_connections_closed_total", reason="header_timeout") - \
        _metric(before, "mixnet_connections_closed_total", reason="header_timeout")
    assert closed >= 300
    assert _metric(after, "mixnet_connections_closed_total", reason="slow_body") >= 1


@needs_serve
def test_every_overload_refusal_is_the_json_503_counted_and_logged(guarded, photos):
    body = photos[1].read_bytes()
    before = _metric(_metrics(guarded), "mixnet_http_requests_total", endpoint="/v1/classify", status="503")
    log_before = _log_lines(guarded, 503)

    def post() -> tuple[int, Any, bytes, float]:
        started = time.monotonic()
        response = _post(guarded, data=body)
        return response.status_code, response.headers, response.content, time.monotonic() - started

    with ThreadPoolExecutor(max_workers=40) as pool:
        flood = [pool.submit(post) for _ in range(120)]
        healthz = [requests.get(guarded.url + "/healthz", timeout=10).status_code for _ in range(5)]
        answers = [future.result() for future in flood]
    refused = [answer for answer in answers if answer[0] == 503]
    assert healthz == [200] * 5
    assert {answer[0] for answer in answers} <= {200, 503} and refused
    for _, headers, content, elapsed in refused:
        assert headers["Retry-After"] == "1" and headers["content-type"] == "application/json"
        assert json.loads(content)["error"]["type"] == "Overloaded"
        assert elapsed < 2.0  # refused before the body is read; the 2-core machine is busy with the admitted
    after = _metric(_metrics(guarded), "mixnet_http_requests_total", endpoint="/v1/classify", status="503")
    assert after - before == len(refused)
    # Logged as the access log's format says: a JSON line each (written just after each answer: allow a moment).
    deadline = time.monotonic() + 5
    while _log_lines(guarded, 503) - log_before < len(refused) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _log_lines(guarded, 503) - log_before == len(refused)


class SlowBodies:
    """``count`` requests, each declaring a body of ``length`` bytes and sending ``chunk`` bytes every 0.5 s (above
    the minimum body rate when ``chunk`` >= 512), half to /v1/classify and half to v2 infer, until closed."""

    def __init__(self, port: int, count: int, length: int = 200_000, chunk: int = 2048) -> None:
        self.port, self.count, self.length, self.chunk = port, count, length, chunk
        self.socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "SlowBodies":
        for index in range(self.count):
            sock = socket.create_connection(("127.0.0.1", self.port))
            sock.sendall(_head("/v1/classify" if index % 2 else V2_INFER, self.length))
            self.socks.append(sock)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.socks:
            sock.close()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for sock in self.socks:
                try:
                    sock.send(b"x" * self.chunk)
                except OSError:
                    pass


@needs_serve
def test_slow_uploads_take_no_place_in_the_queue(guarded, photos):
    """Three times --max-queue (4) uploads in progress at 4 KiB/s, above the minimum body rate: they hold no room
    in the images' queue, so photos from another client are all answered; a body below the minimum rate is closed
    and counted as the service's doing (408, reason slow_body), not as a client hang-up (499)."""
    body = photos[3].read_bytes()
    before = _metrics(guarded)
    answers = []
    with SlowBodies(guarded.port, 12):
        drip = socket.create_connection(("127.0.0.1", guarded.port))
        drip.sendall(_head("/v1/classify", 100_000))
        refused = socket.create_connection(("127.0.0.1", guarded.port))  # answered 413 at once, then drips on
        refused.sendall(_head("/v1/classify", 100 * 1024 * 1024))
        ends = time.monotonic() + 7  # the drip's grace (5 s) and a check (1 s) pass
        while time.monotonic() < ends:
            started = time.monotonic()
            answers.append((_post(guarded, data=body).status_code, time.monotonic() - started))
            for sock in (drip, refused):
                with contextlib.suppress(OSError):
                    sock.send(b"x")
            time.sleep(0.2)
        assert _closed_within(drip, 2.0), "a body below the minimum rate is closed"
        assert _closed_within(refused, 2.0), "also when it was answered before its end"
        during = _metrics(guarded)
    assert len(answers) >= 10 and all(status == 200 and elapsed < 3 for status, elapsed in answers), answers

    def count(text: str, status: str) -> float:
        return _metric(text, "mixnet_http_requests_total", endpoint="/v1/classify", status=status)

    assert count(during, "408") - count(before, "408") == 1
    assert count(during, "499") == count(before, "499")
    assert _metric(during, "mixnet_connections_closed_total", reason="slow_body") > \
        _metric(before, "mixnet_connections_closed_total", reason="slow_body")


@needs_serve
def test_an_image_cut_off_at_its_deadline_while_decoding_is_counted_as_dropped(guarded):
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (6000, 6000), (90, 120, 150)).save(png, format="PNG")  # a few hundred ms to decode
    before = _metric(_metrics(guarded), "mixnet_images_dropped_total", model="MixNet_S")
    response = _post(guarded, "?deadline_ms=100", data=png.getvalue())
    assert response.status_code == 504, response.text
    assert _metric(_metrics(guarded), "mixnet_images_dropped_total", model="MixNet_S") == before + 1


@needs_serve
def test_a_request_that_can_never_be_admitted_is_413_naming_the_limit(guarded, photos, tmp_path, monkeypatch):
    limits = requests.get(guarded.url + "/v1/limits", headers=AUTH, timeout=10).json()
    assert limits["max_images_per_request"] == 4 and limits["urls"] == "public"
    files = [("image", (p.name, p.read_bytes())) for p in photos[:5]]
    five = _post(guarded, files=files)
    assert five.status_code == 413 and "Retry-After" not in five.headers
    assert five.json()["error"]["type"] == "TooManyImages" and "at most 4" in five.json()["error"]["message"]
    parts = _post(guarded, files=[("image", ("a.jpg", b"x"))] * 1000)
    assert parts.status_code == 413 and parts.json()["error"]["type"] == "TooManyParts"
    assert "at most 4 images" in parts.json()["error"]["message"]
    # classify --server splits -b 100 into requests the service takes.
    monkeypatch.setenv("MIXNET_SERVE_TOKEN", TOKEN)
    result = CliRunner().invoke(main, ["classify", *map(str, photos), "--server", guarded.url, "-b", "100",
                                       "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [row["input"] for row in json.loads(result.stdout)] == [str(p) for p in photos]


@needs_serve
def test_unknown_query_parameters_are_400_naming_them(guarded, photos):
    response = _post(guarded, "?top_k=1&topk=1", data=photos[0].read_bytes())
    assert response.status_code == 400
    assert "unknown query parameter top_k" in response.json()["error"]["message"]
    assert "model, topk, deadline_ms, url" in response.json()["error"]["message"]
    assert requests.get(guarded.url + "/v1/limits?x=1", headers=AUTH, timeout=10).status_code == 400
    # What machines poll ignores them: probes and scrapers add cache-busting or scrape parameters.
    for path in ("/healthz?nocache=1", "/readyz?x=1", "/metrics?format=text", "/v2/health/ready?t=1"):
        assert requests.get(guarded.url + path, headers=AUTH, timeout=10).status_code == 200, path


@needs_serve
def test_a_compressed_body_is_415_on_v1_as_on_v2(guarded, photos):
    import gzip

    body = gzip.compress(photos[0].read_bytes())
    v1 = requests.post(guarded.url + "/v1/classify", data=body, headers={**AUTH, "Content-Encoding": "gzip"},
                       timeout=30)
    v2 = requests.post(guarded.url + V2_INFER, data=body, headers={**AUTH, "Content-Encoding": "gzip"}, timeout=30)
    assert (v1.status_code, v2.status_code) == (415, 415), (v1.text, v2.text)
    assert v1.json()["error"] == {"type": "UnsupportedMediaType", "message": v2.json()["error"]}
    assert "Content-Encoding gzip is not accepted" in v2.json()["error"]


@needs_serve
def test_the_token_is_required_except_on_the_probes_and_never_logged(guarded, photos, monkeypatch, tmp_path):
    body = photos[0].read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        response = requests.post(guarded.url + "/v1/classify", data=body, headers=headers, timeout=30)
        assert response.status_code == 401, headers
        assert response.json()["error"]["type"] == "Unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(guarded.url + "/metrics", timeout=10).status_code == 401  # no --public-metrics
    assert requests.get(guarded.url + "/v1/limits", timeout=10).status_code == 401
    for path in ("/healthz", "/readyz"):
        assert requests.get(guarded.url + path, timeout=10).status_code == 200
    assert _post(guarded, data=body).status_code == 200
    assert TOKEN not in guarded.log.read_text(encoding="utf-8")
    monkeypatch.delenv("MIXNET_SERVE_TOKEN", raising=False)
    refused = CliRunner().invoke(main, ["classify", str(photos[0]), "--server", guarded.url],
                                 catch_exceptions=False)
    assert refused.exit_code == 1 and "needs its token" in refused.stderr
    wrong = tmp_path / "wrong-token"
    wrong.write_text(TOKEN + "x\n")
    refused = CliRunner().invoke(main, ["classify", str(photos[0]), "--server", guarded.url, "--token-file",
                                        str(wrong)], catch_exceptions=False)
    assert refused.exit_code == 1 and "refused the token given" in refused.stderr, refused.stderr


def test_a_token_file_goes_to_classify_server_and_serve_warns_without_one_off_loopback(tmp_path, photos):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = CliRunner().invoke(main, ["classify", str(photos[0]), "--server", "http://127.0.0.1:9",
                                       "--token-file", str(empty)], catch_exceptions=False)
    assert result.exit_code == 2 and "the file is empty" in result.stderr
    alone = CliRunner().invoke(main, ["classify", str(photos[0]), "--token-file", str(empty)],
                               catch_exceptions=False)
    assert alone.exit_code == 2 and "use it with --server" in alone.stderr


@needs_serve
def test_serve_warns_when_listening_beyond_loopback_without_a_token(isolated_home):
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--port", "0", "--offline"],
                                catch_exceptions=False)
    warnings = [line for line in result.stderr.splitlines() if "without a token" in line]
    assert len(warnings) == 1 and "--token-file" in warnings[0]
    quiet = CliRunner().invoke(main, ["serve", "--port", "0", "--offline"], catch_exceptions=False)
    assert "without a token" not in quiet.stderr


class _Redirector(http.server.BaseHTTPRequestHandler):
    target = ""
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        type(self).seen.append(self.path)
        self.send_response(302)
        self.send_header("Location", type(self).target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@needs_serve
def test_urls_reach_only_public_addresses_and_say_nothing_of_what_listens(guarded, photos, file_server):
    host = file_server(photos[0].parent)
    closed_port = socket.socket()
    closed_port.bind(("127.0.0.1", 0))
    closed = closed_port.getsockname()[1]
    closed_port.close()
    messages = []
    for url in (f"{host.url}/{photos[0].name}", f"http://127.0.0.1:{closed}/{photos[0].name}",
                f"http://localhost:{host.url.rsplit(':', 1)[1]}/{photos[0].name}",
                f"http://[::1]:{closed}/x.jpg", "http://169.254.169.254/latest/meta-data/",
                "http://10.0.0.1/x.jpg", "http://user:hunter2@127.0.0.1:9/x.jpg"):
        response = _post(guarded, "?" + requests.compat.urlencode({"url": url}))
        assert response.status_code == 400, (url, response.text)
        assert response.json()["error"]["type"] == "ForbiddenURL"
        messages.append(response.json()["error"]["message"].replace(url, "URL"))
    # URLs that cannot be fetched as written (int(), IDNA and urlsplit once raised here): 400 naming the problem,
    # nothing resolved or contacted.
    for url, words in ((f"http://[::1:{closed}/x.jpg", "Invalid IPv6 URL"),
                       (f"http://\u2460\u2461\u2466.0.0.1:{closed}/x.jpg", "plain characters"),
                       ("http://" + "a" * 64 + ".example/x.jpg", "not a valid domain name"),
                       ("http://127.0.0.1:99999/x.jpg", "Port out of range")):
        response = _post(guarded, "?" + requests.compat.urlencode({"url": url}))
        assert response.status_code == 400, (url, response.text)
        assert response.json()["error"]["type"] == "BadURL" and words in response.json()["error"]["message"], url
    assert host.requests == []
    # An open port and a closed one get the same answer: no oracle of what listens inside.
    assert messages[0] == messages[1] and "--allow-private-urls" in messages[0]
    deadline = time.monotonic() + 5  # the access line is written just after the answer is sent
    while "***@127.0.0.1" not in guarded.log.read_text(encoding="utf-8"):
        assert time.monotonic() < deadline, "the request with a password was not logged"
        time.sleep(0.05)
    assert "hunter2" not in guarded.log.read_text(encoding="utf-8") and "hunter2" not in messages[-1]


class SlowImages:
    """A server on 127.0.0.1 whose every answer promises an image and drips it, a byte every 0.2 s, until the
    client hangs up; ``connections`` counts the clients it has dripped to."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(connection,), daemon=True).start()

    def _drip(self, connection: socket.socket) -> None:
        with connection:
            try:
                connection.recv(65536)
                self.connections += 1
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
                while not self._stop.is_set():
                    connection.sendall(b"\xff")
                    time.sleep(0.2)
            except OSError:
                pass  # the fetcher hung up (its deadline)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


@needs_serve
def test_slow_urls_never_delay_uploaded_images(mirror, home, photos, tmp_path):
    """More dripping URLs than decode threads (one): the uploads beside them are answered at once, as URLs are
    fetched in async I/O. (The module's server fetches public addresses only: this one also fetches
    127.0.0.1.)"""
    slow = SlowImages()
    server = ServerProcess(home, mirror.url, tmp_path / "intranet.log", "--model", "S", "--workers", "1",
                           "--allow-urls", "--allow-private-urls", "--no-access-log")
    try:
        server.wait_for("/readyz", 200)
        fetches = 3
        query = "?" + requests.compat.urlencode({"url": f"{slow.url}/slow.jpg", "deadline_ms": 4000})
        with ThreadPoolExecutor(max_workers=fetches) as pool:
            dripping = [pool.submit(server.post, query) for _ in range(fetches)]
            deadline = time.monotonic() + 10
            while slow.connections < 1:
                assert time.monotonic() < deadline, "the service never fetched the slow URL"
                time.sleep(0.05)
            time.sleep(0.5)
            at_once = slow.connections
            latencies = []
            for photo in photos[:5]:
                started = time.monotonic()
                response = server.post(data=photo.read_bytes())
                latencies.append(time.monotonic() - started)
                assert response.status_code == 200, response.text
            # Tens of ms each; a fetch in the (one) decode thread held them for its 4 s.
            assert max(latencies) < 2.0, latencies
            assert not any(future.done() for future in dripping), "the slow URLs ended before the uploads"
            statuses = [future.result().status_code for future in dripping]
    finally:
        server.stop()
        slow.close()
    assert at_once == fetches, "the slow URLs are fetched at once, not one after the other"
    assert set(statuses) <= {422, 504}, statuses


def test_a_redirect_to_a_private_address_is_refused_before_it_is_followed(tmp_path):
    from mixnet_cli.service.url_fetch import ForbiddenAddress, fetch_image

    _Redirector.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    _Redirector.target = f"http://127.0.0.2:{port}/inside"
    try:
        # The first host is let through (as a public one would be); its redirect is checked again.
        with pytest.raises(ForbiddenAddress, match="redirects to a host that is not a public address"):
            asyncio.run(fetch_image(f"http://127.0.0.1:{port}/start", deadline_s=10, max_bytes=1000,
                                    allowed=lambda address: address == "127.0.0.1"))
        assert _Redirector.seen == ["/start"]
    finally:
        server.shutdown()
        server.server_close()


def test_the_address_check_is_ipaddress_with_embedded_ipv4_checked_too():
    from mixnet_cli.service.url_fetch import is_public_address, without_credentials

    refused = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
               "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "198.18.0.1", "::1", "::",
               "fe80::1%2", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::",
               "2001:0:4136:e378:8000:63bf:f5ff:fffe", "not an address"]
    assert [address for address in refused if is_public_address(address)] == []
    assert all(is_public_address(a) for a in ("8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8"))
    assert without_credentials("https://me:pw@example.com/a.jpg") == "https://***@example.com/a.jpg"


def test_a_url_past_its_deadline_leaves_no_thread_and_no_socket():
    from mixnet_cli.images.inputs import ImageDownloadError
    from mixnet_cli.service.url_fetch import fetch_image

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    closed = threading.Event()

    def drip() -> None:
        connection, _ = listener.accept()
        connection.recv(4096)
        try:
            connection.sendall(b"HTTP/1.1 200 OK\r\n")
            while True:  # a header byte now and then: never idle long enough for a read timeout
                connection.sendall(b"X")
                time.sleep(0.1)
        except OSError:
            closed.set()  # the fetcher closed its side
        finally:
            connection.close()

    threading.Thread(target=drip, daemon=True).start()
    threads = threading.active_count()
    started = time.monotonic()
    with pytest.raises(ImageDownloadError, match="not complete within 1 s"):
        asyncio.run(fetch_image(f"http://127.0.0.1:{port}/slow.jpg", deadline_s=1, max_bytes=1000,
                                allow_private=True))
    assert time.monotonic() - started < 2.5
    assert closed.wait(5), "the socket to the slow server is closed at the deadline"
    assert threading.active_count() <= threads
    listener.close()


@needs_serve
def test_a_jpeg_opencv_refuses_is_not_scanned_by_pillow(guarded):
    started = time.monotonic()
    response = _post(guarded, data=b"\xff\xd8" + b"\xff" * (31 * 1024 * 1024))
    assert response.status_code == 422
    assert time.monotonic() - started < 3.0  # Pillow's marker scan took 9 s on this file


def test_the_pixel_budget_decodes_huge_images_a_few_at_a_time():
    from mixnet_cli.service.batching import PixelBudget

    events: list[str] = []
    peak = 0

    def decoding(budget: PixelBudget, name: str, seconds: float) -> None:  # in a decode thread
        nonlocal peak
        peak = max(peak, budget.used)
        events.append(f"+{name}")
        time.sleep(seconds)
        events.append(f"-{name}")

    async def scenario() -> None:
        budget = PixelBudget(100)
        with ThreadPoolExecutor(max_workers=4) as threads:
            await asyncio.gather(*(budget.run(pixels, threads, decoding, budget, name, seconds)
                                   for name, pixels, seconds in (("huge1", 90, 0.2), ("huge2", 90, 0.2),
                                                                 ("small", 5, 0.01), ("huge3", 500, 0.05))))
        assert budget.used == 0

    asyncio.run(scenario())
    assert peak <= 100
    # The small one passes beside the first huge one; the other huge ones wait their turn, one at a time.
    assert events[:3] == ["+huge1", "+small", "-small"]
    assert events.index("+huge2") > events.index("-huge1") and events.index("+huge3") > events.index("-huge2")


def test_images_past_their_deadline_are_images_before_inference():
    from mixnet_cli.service.batching import DynamicBatcher

    ran: list[int] = []

    def run_batch(arrays: list[np.ndarray]) -> np.ndarray:
        ran.extend(int(a[0]) for a in arrays)
        time.sleep(0.05)
        return np.stack(arrays)

    async def scenario() -> list[Any]:
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = DynamicBatcher(run_batch, pool, max_batch_size=2, max_wait_s=0.0, max_queue=8)
            batcher.start()
            loop = asyncio.get_running_loop()
            first = asyncio.ensure_future(batcher.submit(np.full(3, 1.0)))  # its batch runs 50 ms
            await asyncio.sleep(0.01)
            late = asyncio.ensure_future(batcher.submit(np.full(3, 2.0), deadline=loop.time() + 0.02))
            on_time = asyncio.ensure_future(batcher.submit(np.full(3, 3.0), deadline=loop.time() + 5))
            results = await asyncio.gather(first, late, on_time, return_exceptions=True)
            await batcher.close()
            assert batcher.dropped == 1
            return results

    results = asyncio.run(scenario())
    assert isinstance(results[1], asyncio.TimeoutError)
    assert ran == [1, 3], "the image whose deadline passed while it waited never reached the engine"


V2_INFER = "/v2/models/MixNet_S/infer"


def _v2_binary(image: bytes) -> tuple[bytes, int]:
    """A v2 infer body of one image in the binary-data extension, and the length of its JSON header."""
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 4 + len(image)}}]}).encode()
    return header + len(image).to_bytes(4, "little") + image, len(header)


def _head(path: str, length: int, header_length: int | None = None) -> bytes:
    extra = "" if header_length is None else f"Inference-Header-Content-Length: {header_length}\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n{extra}"
            f"Content-Length: {length}\r\n\r\n").encode()


@needs_serve
@pytest.mark.parametrize("endpoint", ["/v1/classify", "/v2/models/{name}/infer"], ids=["v1", "v2"])
def test_a_client_that_hangs_up_is_499_with_no_warning(guarded, endpoint):
    import io

    from PIL import Image

    def request(image: bytes) -> tuple[bytes, bytes]:
        """The head and body of a request of ``image`` to ``endpoint``."""
        if endpoint == "/v1/classify":
            return _head(endpoint, len(image)), image
        body, header_length = _v2_binary(image)
        return _head(V2_INFER, len(body), header_length), body

    def count(text: str, status: str) -> float:
        return _metric(text, "mixnet_http_requests_total", endpoint=endpoint, status=status)

    before = count(_metrics(guarded), "499")
    images_before = _metric(_metrics(guarded), "mixnet_images_total", model="MixNet_S")
    lines_before = len(guarded.log.read_text(encoding="utf-8").splitlines())
    head, body = request(b"\xff\xd8" * 25000)
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:  # gone in the middle of its body
        sock.sendall(head + body[:2000])
        time.sleep(0.3)
    # Gone while its image decodes (a 36-megapixel PNG: a few hundred ms): the image never reaches the engine.
    png = io.BytesIO()
    Image.new("RGB", (6000, 6000), (90, 120, 150)).save(png, format="PNG")
    head, body = request(png.getvalue())
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(head + body)
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while count(_metrics(guarded), "499") < before + 2:
        assert time.monotonic() < deadline, "the hang-ups were never counted as 499"
        time.sleep(0.1)
    time.sleep(1.0)  # the decode ends; had the image been queued, it would be classified by now
    assert _metric(_metrics(guarded), "mixnet_images_total", model="MixNet_S") == images_before
    assert count(_metrics(guarded), "500") == 0
    new_lines = guarded.log.read_text(encoding="utf-8").splitlines()[lines_before:]
    assert all(line.startswith("{") for line in new_lines), new_lines  # access log lines only: no warning


def _huge_png(width: int, height: int) -> bytes:
    """A valid RGB PNG of black pixels: a few hundred KB that decode to width*height*3 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + width * 3)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _memory_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


@needs_serve
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak memory from /proc")
def test_huge_images_are_decoded_one_at_a_time_while_photos_pass(guarded, photos):
    """Two 169-megapixel PNGs at once (507 MB of pixels each): decoded one after the other, so the service's
    peak memory grows by about one of them, and a photo sent meanwhile is answered at once."""
    png = _huge_png(13000, 13000)
    pid = guarded.process.pid
    before = _memory_mb(pid, "VmRSS")
    assert _memory_mb(pid, "VmHWM") < before + 300, "an earlier test already took the peak this one measures"
    photo = photos[2].read_bytes()
    with ThreadPoolExecutor(max_workers=2) as pool:
        huge = [pool.submit(_post, guarded, data=png) for _ in range(2)]
        time.sleep(1.0)  # both are in: one decoding, one waiting for the pixel budget
        latencies = []
        while not all(future.done() for future in huge):
            started = time.monotonic()
            assert _post(guarded, data=photo).status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.2)
        statuses = [future.result().status_code for future in huge]
    assert statuses == [200, 200], statuses
    assert latencies and max(latencies) < 5, latencies
    # One 169 MP decode holds its RGB pixels (507 MB) and OpenCV's working copies; two at once held 1.9 GB.
    assert _memory_mb(pid, "VmHWM") - before < 1200


SMALL_CONNECTIONS = 16
SMALL_BODY_BYTES = int(0.1 * 1024 * 1024)  # --max-body-mb 0.1: bodies in transit may hold 4 of that


@pytest.fixture(scope="module")
def small(mirror: GatedMirror, home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A second server, with a ceiling of 16 connections and a body limit of 0.1 MB, so that the ceiling and the
    budget of bodies in transit are reached with a few sockets. Its last test interrupts it twice."""
    server = ServerProcess(home, mirror.url, tmp_path_factory.mktemp("small") / "server.log",
                           "--model", "S", "--max-connections", str(SMALL_CONNECTIONS), "--max-body-mb", "0.1",
                           "--header-timeout", "10", "--public-metrics")
    try:
        server.wait_for("/readyz", 200)
        yield server
    finally:
        server.stop()


@needs_serve
def test_at_the_connection_ceiling_the_longest_idle_connection_makes_room(small, photos):
    """The ceiling filled with sockets that sent nothing: /healthz and a photo are answered, each in the place of
    the connection idle longest. Filled with requests in progress, a newcomer is closed instead."""
    body = photos[0].read_bytes()
    idle = [socket.create_connection(("127.0.0.1", small.port)) for _ in range(SMALL_CONNECTIONS)]
    try:
        time.sleep(0.3)
        assert small.get("/healthz").status_code == 200
        assert _closed_within(idle[0], 1.0), "the oldest made room"
        idle.append(socket.create_connection(("127.0.0.1", small.port)))  # the ceiling full again
        time.sleep(0.3)
        assert small.post(data=body).status_code == 200
        assert _closed_within(idle[1], 1.0), "the next oldest made room"
        assert not _closed_within(idle[-1], 0.2)
        assert _metric(small.get("/metrics").text, "mixnet_connections_closed_total", reason="evicted_idle") >= 2
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    busy = []
    try:
        for _ in range(SMALL_CONNECTIONS):  # each a request whose body is on its way (within its 5 s of grace)
            sock = socket.create_connection(("127.0.0.1", small.port))
            sock.sendall(_head("/v1/classify", 1000) + b"x")
            busy.append(sock)
        time.sleep(0.3)
        with pytest.raises(requests.ConnectionError):
            small.get("/healthz")
    finally:
        for sock in busy:
            sock.close()
    time.sleep(0.3)
    assert _metric(small.get("/metrics").text, "mixnet_connections_closed_total", reason="too_many_connections") >= 1


@needs_serve
def test_bodies_in_transit_share_a_budget_refused_with_the_json_503(small, photos):
    """Three bodies of the largest size, all but their last byte sent at full speed and then stalled, fill the
    budget (4 x --max-body-mb) but for its reserve: a fourth is refused at once with the one overload answer, while
    a photo (a small body) is taken from the reserve. Stalled, their average rate stays far above the minimum, but
    nothing arrives: the body idle timeout (5 s) closes them (408, slow_body), and large uploads are taken again."""
    body = photos[0].read_bytes()
    assert len(body) <= SMALL_BODY_BYTES // 4, "the photo is a small body"
    before = small.get("/metrics").text
    holders = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", small.port))
            sock.sendall(_head("/v1/classify", SMALL_BODY_BYTES) + b"x" * (SMALL_BODY_BYTES - 1))
            holders.append(sock)
        stalled = time.monotonic()
        time.sleep(0.5)
        refused = requests.post(small.url + "/v1/classify", data=b"x" * SMALL_BODY_BYTES, timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
        assert refused.json()["error"]["type"] == "Overloaded"
        assert "request bodies" in refused.json()["error"]["message"]
        assert small.post(data=body).status_code == 200, "the reserve takes a photo"
        for sock in holders:
            assert _closed_within(sock, max(0.1, stalled + 7.5 - time.monotonic())), "a stalled body is closed"
        assert time.monotonic() - stalled >= 4.5, "after the body idle timeout, not before"
    finally:
        for sock in holders:
            sock.close()
    after = small.get("/metrics").text
    assert _metric(after, "mixnet_connections_closed_total", reason="slow_body") - \
        _metric(before, "mixnet_connections_closed_total", reason="slow_body") == 3
    assert _metric(after, "mixnet_http_requests_total", endpoint="/v1/classify", status="408") - \
        _metric(before, "mixnet_http_requests_total", endpoint="/v1/classify", status="408") == 3
    taken = requests.post(small.url + "/v1/classify", data=b"x" * SMALL_BODY_BYTES, timeout=10)
    assert taken.status_code == 422, taken.text  # read, and found not to be an image: no longer refused


@needs_serve
def test_an_answer_given_before_the_body_ends_closes_its_connection_after_a_short_linger(small):
    """The ceiling (16) filled with requests answered at once (405) whose bodies keep coming above the minimum
    rate: each answer says Connection: close, each connection is closed within the linger (2 s) however long its
    client goes on sending, and meanwhile a newcomer takes the place of one (it no longer waits for anything).
    A client that sends its whole body before reading (as curl and requests do) still reads its 413."""
    before = small.get("/metrics").text
    socks = []
    try:
        for _ in range(SMALL_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", small.port))
            sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 33554432\r\n\r\n")
            socks.append(sock)
        answered = time.monotonic()
        heads = []
        for sock in socks:
            sock.settimeout(2)
            heads.append(sock.recv(65536).split(b"\r\n\r\n", 1)[0].lower())
        assert all(head.startswith(b"http/1.1 405") and b"connection: close" in head for head in heads), heads
        assert small.get("/healthz").status_code == 200, "a lingering connection makes room at the ceiling"
        open_socks = list(socks)
        while open_socks and time.monotonic() - answered < 4:
            for sock in list(open_socks):
                try:
                    sock.send(b"y" * 200)  # 2 KB/s: above the minimum body rate
                    sock.setblocking(False)
                    if sock.recv(65536) == b"":
                        open_socks.remove(sock)
                except BlockingIOError:
                    pass
                except OSError:
                    open_socks.remove(sock)
            time.sleep(0.1)
        assert not open_socks and time.monotonic() - answered < 3.5, f"{len(open_socks)} left open"
    finally:
        for sock in socks:
            sock.close()
    assert _metric(small.get("/metrics").text, "mixnet_connections_closed_total", reason="evicted_idle") > \
        _metric(before, "mixnet_connections_closed_total", reason="evicted_idle")
    too_large = requests.post(small.url + "/v1/classify", data=b"x" * (40 * SMALL_BODY_BYTES), timeout=10)
    assert too_large.status_code == 413 and too_large.headers["connection"] == "close"
    assert too_large.json()["error"]["type"] == "RequestTooLarge"


@needs_serve
def test_a_second_ctrl_c_answers_the_requests_in_flight_503_and_exits_at_once(small, photos):
    """SIGTERM, then Ctrl-C (SIGINT) during the drain: the requests in flight (bodies still arriving) get the JSON
    503 at once instead of waiting out the graceful timeout (20 s), no traceback is logged, the exit is 0."""
    body = photos[0].read_bytes()
    v2_body, header_length = _v2_binary(body)
    in_flight = []
    for head, data in ((_head("/v1/classify", len(body)), body), (_head(V2_INFER, len(v2_body), header_length),
                                                                  v2_body)):
        sock = socket.create_connection(("127.0.0.1", small.port))
        sock.sendall(head + data[:100])
        in_flight.append(sock)
    time.sleep(0.3)
    small.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    stopped = time.monotonic()
    small.process.send_signal(signal.SIGINT)
    answers = [_read_answer(sock) for sock in in_flight]
    assert time.monotonic() - stopped < 3, "answered at once, not at the graceful timeout"
    for answer in answers:
        head, _, content = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower(), answer
        assert b"stopping" in content and b"application/json" in head.lower(), answer
    assert small.process.wait(timeout=10) == 0
    assert time.monotonic() - stopped < 5
    log = small.log.read_text(encoding="utf-8")
    assert "Traceback" not in log and "Internal Server Error" not in log, log[-3000:]


@needs_serve
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak memory from /proc")
def test_huge_images_with_maps_are_decoded_within_the_same_pixel_budget(guarded):
    """?cam=1 runs outside the batcher, in the decode threads: two 169-megapixel PNGs at once took twice the
    memory of one (eight: 7.4 GB) until the maps' decodes held the same pixel budget."""
    png = _huge_png(13000, 13000)
    pid = guarded.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak so far (an earlier test's) is forgotten
    before = _memory_mb(pid, "VmRSS")
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda _: _post(guarded, "?cam=1", data=png), range(2)))
    assert [answer.status_code for answer in answers] == [200, 200], [answer.text[:200] for answer in answers]
    assert all("cam" in answer.json() for answer in answers)
    assert _memory_mb(pid, "VmHWM") - before < 1200


def test_the_pixel_budget_holds_a_decode_until_its_thread_ends_and_never_starts_one_whose_request_is_gone():
    """A thread cannot be stopped: a request cancelled while its image decodes keeps that image's pixels until the
    decode ends (else the next huge one would start beside it); one cancelled while it waits never decodes."""
    from mixnet_cli.service.batching import PixelBudget

    started: list[str] = []
    release = threading.Event()

    def decode(name: str) -> str:
        started.append(name)
        release.wait(10)
        return name

    async def scenario() -> None:
        budget = PixelBudget(100)
        with ThreadPoolExecutor(max_workers=2) as threads:
            first = asyncio.ensure_future(budget.run(90, threads, decode, "first"))
            second = asyncio.ensure_future(budget.run(90, threads, decode, "second"))
            await asyncio.sleep(0.1)
            first.cancel()  # its request is gone, its decode is not
            second.cancel()  # gone while waiting for room
            await asyncio.sleep(0.1)
            assert budget.used == 90 and started == ["first"]
            release.set()
            for _ in range(100):
                await asyncio.sleep(0.01)
                if budget.used == 0:
                    break
            assert budget.used == 0 and started == ["first"]
            assert await budget.run(100, threads, decode, "third") == "third"

    asyncio.run(scenario())


@needs_serve
def test_sigterm_closes_keep_alive_connections_answers_in_flight_and_exits_0(guarded, photos):
    """Runs last: it stops the module's server. In flight at SIGTERM: a /v1 and a v2 request whose bodies end
    after it (answered), and a v2 request whose body never ends (504 before the graceful timeout ends, rather
    than cut off without an answer); a request pipelined behind one in flight is refused, 503 with
    Connection: close, rather than dropped."""
    body = photos[0].read_bytes()
    v2_body, header_length = _v2_binary(body)
    idle = socket.create_connection(("127.0.0.1", guarded.port))  # a keep-alive connection, idle at SIGTERM
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200")
    # Requests in flight at SIGTERM: their bodies half sent.
    in_flight = {}
    for name, head, data in (("v1", _head("/v1/classify", len(body)), body),
                             ("pipelined", _head("/v1/classify", len(body)), body),
                             ("v2", _head(V2_INFER, len(v2_body), header_length), v2_body),
                             ("v2 stuck", _head(V2_INFER, len(v2_body), header_length), v2_body)):
        sock = socket.create_connection(("127.0.0.1", guarded.port))
        sock.sendall(head + data[:100])
        in_flight[name] = sock, data
    time.sleep(0.3)
    stopped = time.monotonic()
    guarded.process.send_signal(signal.SIGTERM)
    # Before the requests in flight end: the idle connection is closed, and no new one is taken.
    assert _closed_within(idle, 1.0), "an idle keep-alive connection is closed at SIGTERM (not by --keep-alive 2)"
    with pytest.raises(OSError):
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=2) as late:
            late.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            if not late.recv(65536):
                raise ConnectionResetError("closed without an answer")
    for name in ("v1", "v2"):
        sock, data = in_flight[name]
        sock.sendall(data[100:])
    pipelined, _ = in_flight.pop("pipelined")
    pipelined.sendall(body[100:] + _head("/v1/classify", len(body)) + body)
    both = b""
    pipelined.settimeout(15)
    while chunk := pipelined.recv(65536):
        both += chunk
    pipelined.close()
    first, second = both.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200") and b"connection: close" not in first.lower(), both
    assert second.startswith(b"503") and b"connection: close" in second.lower(), both
    assert json.loads(second.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "Overloaded"
    answers = {name: _read_answer(sock) for name, (sock, _) in in_flight.items()}
    heads = {name: answer.split(b"\r\n\r\n", 1)[0].lower() for name, answer in answers.items()}
    assert all(b"connection: close" in head for head in heads.values()), answers
    assert heads["v1"].startswith(b"http/1.1 200") and heads["v2"].startswith(b"http/1.1 200"), answers
    assert heads["v2 stuck"].startswith(b"http/1.1 504"), answers["v2 stuck"]
    assert "deadline" in json.loads(answers["v2 stuck"].split(b"\r\n\r\n", 1)[1])["error"]
    assert guarded.process.wait(timeout=15) == 0, guarded.stderr()
    assert time.monotonic() - stopped < GRACEFUL_TIMEOUT_S + 1


def _read_answer(sock: socket.socket) -> bytes:
    """One HTTP response from ``sock`` (up to its Content-Length, or until the server closes)."""
    answer = b""
    sock.settimeout(15)
    while b"\r\n\r\n" not in answer or not _complete(answer):
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    sock.close()
    return answer


def _complete(answer: bytes) -> bool:
    head, _, rest = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(rest) >= int(line.split(b":")[1])
    return False


def test_the_header_reader_sizes_jpegs_and_pngs_as_pillow_does(tmp_path):
    import io

    from PIL import Image

    from mixnet_cli.images.preprocess import header_pixels, jpeg_size

    rgb = Image.new("RGB", (640, 480), (10, 200, 30))
    thumbnail = io.BytesIO()
    Image.new("RGB", (160, 120)).save(thumbnail, format="JPEG")
    for options in ({}, {"progressive": True}, {"exif": Image.Exif(), "icc_profile": b"\0" * 70000},
                    {"quality": 10, "subsampling": 0}):
        out = io.BytesIO()
        rgb.save(out, format="JPEG", **options)
        data = out.getvalue()
        assert jpeg_size(data) == (640, 480), options
    # A frame header inside an APP1 segment (a thumbnail) is skipped: the image's own is the one read.
    main = io.BytesIO()
    rgb.save(main, format="JPEG")
    app1 = b"Exif\0\0" + thumbnail.getvalue()
    data = main.getvalue()[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + main.getvalue()[2:]
    assert jpeg_size(data) == (640, 480)
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    assert header_pixels(png.getvalue()) == 640 * 480
    webp = io.BytesIO()
    rgb.save(webp, format="WEBP")
    assert header_pixels(webp.getvalue()) is None and header_pixels(webp.getvalue(), other_formats=True) == 640 * 480
    assert jpeg_size(b"\xff\xd8" + b"\xff" * 200_000) is None and jpeg_size(b"GIF89a") is None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="malloc_trim is glibc's (Linux)")
def test_memory_is_trimmed_after_a_large_body_only_one_trim_at_a_time():
    from mixnet_cli.service.memory import TRIM_AFTER_BYTES, MemoryTrimmer

    trimmer = MemoryTrimmer()
    calls = []
    found = trimmer._trim
    if found is None:
        pytest.skip("this C library has no malloc_trim (not glibc)")

    def trim(pad: int) -> int:
        calls.append(pad)
        time.sleep(0.05)
        return found(pad)

    trimmer._trim = trim

    async def scenario() -> None:
        trimmer.body_read(1000)
        trimmer.request_ended()
        assert calls == [], "a small body is not worth a trim"
        trimmer.body_read(TRIM_AFTER_BYTES)
        trimmer.request_ended()
        trimmer.body_read(TRIM_AFTER_BYTES)
        trimmer.request_ended()  # while the first runs: once it ends, one more
        await asyncio.sleep(0.3)

    asyncio.run(scenario())
    assert calls == [0, 0]


@needs_serve
def test_public_metrics_and_the_token_check_in_process(tmp_path, monkeypatch):
    from mixnet_cli.service.serve import ServeOptions, Service, load_token

    monkeypatch.setenv("MIXNET_SERVE_TOKEN", " from-the-environment ")
    assert load_token(None) == "from-the-environment"
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\nignored\n")
    assert load_token(token_file) == "from-the-file"  # the flag wins over the variable
    assert "from-the-file" not in repr(ServeOptions(token="from-the-file"))
    for public_metrics in (False, True):
        service = Service(ServeOptions(token="t0ken", public_metrics=public_metrics))
        try:
            assert service.is_public("/metrics") is public_metrics
            assert service.is_public("/healthz") and service.is_public("/v2/health/ready")
            assert not service.is_public("/v1/classify") and not service.is_public("/openapi.json")
            assert service.authorized({"authorization": "Bearer t0ken"})
            assert service.authorized({"authorization": "bearer t0ken"})
            assert not service.authorized({"authorization": "Bearer t0ke"}) and not service.authorized({})
        finally:
            service.decoders.shutdown()


def test_whole_numbers_from_clients_are_ascii_digits_within_their_range():
    from mixnet_cli.base.errors import UsageError
    from mixnet_cli.base.http import parse_retry_after
    from mixnet_cli.base.parsing import ascii_whole_number, whole_number

    assert whole_number("250", "deadline_ms", 1, 1000) == 250 and whole_number(b"7", "n") == 7
    # int() takes each of these (or fails with ValueError or OverflowError past it): a client's number is not one.
    for text in ("٣", "1_000", " 7", "+7", "-5", "1e3", "²", "", None, "9" * 400, "9" * 4301, "0x10"):
        assert ascii_whole_number(text) is None, text
        with pytest.raises(UsageError, match="deadline_ms must be a whole number from 1 to 1000"):
            whole_number(text, "deadline_ms", 1, 1000)
    with pytest.raises(UsageError, match=r"got '99999999999999999999\.\.\.'"):  # a long input is cut short
        whole_number("9" * 400, "deadline_ms", 1, 1000)
    with pytest.raises(UsageError, match="from 1 to 1000"):
        whole_number("1001", "deadline_ms", 1, 1000)
    assert [parse_retry_after(text) for text in ("²", "-1", "nan", "3")] == [None, None, None, 3.0]


def test_urls_that_cannot_be_fetched_as_written_are_refused_before_any_lookup():
    from mixnet_cli.service.url_fetch import BadURL, url_target

    assert url_target("http://exämple.com:8080/a.jpg").host == "xn--exmple-cua.com"
    assert (url_target("HTTP://[::1]/").host, url_target("https://a.example/").port) == ("::1", 443)
    assert url_target("http://127\u30020\u30020\u30021/").host == "127.0.0.1"  # IDNA's dots: then checked as 127.0.0.1
    for url, words in [("http://[::1", "Invalid IPv6 URL"), ("http://127.0.0.1:99999/", "Port out of range"),
                       ("http://a" + "a" * 63 + ".com/", "not a valid domain name"), ("http://a..b/", "domain name"),
                       ("http://\u2460\u2462\u2466.0.0.1/", "plain characters"),  # circled digits: 137.0.0.1
                       ("http://\uff45xample.com/", "plain characters"), ("ftp://x/", "http(s)"),
                       ("http://me:pw@[::1/", "***@")]:
        with pytest.raises(BadURL, match=re.escape(words)):
            url_target(url)
    with pytest.raises(BadURL) as refused:
        url_target("http://me:hunter2@[::1/")
    assert "hunter2" not in str(refused.value)


def test_the_text_access_log_escapes_what_the_client_wrote(caplog):
    """A path with %0a decodes to a newline: printed as is, it would write a second, forged access line."""
    from mixnet_cli.service.serve import ServeOptions, Service, create_app

    service = Service(ServeOptions(log_format="text"))
    app = create_app(service)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    forged = '/x\n127.0.0.1 "GET /admin" 200'  # uvicorn's path of /x%0a127.0.0.1%20%22GET%20/admin%22%20200
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": forged, "raw_path": b"/x%0a", "query_string": b"q=%0d%0a\x1b[31m", "root_path": "",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
    try:
        with caplog.at_level("INFO", logger="mixnet_cli.access"):
            asyncio.run(app(scope, receive, send))
    finally:
        service.decoders.shutdown()
    assert sent[0]["status"] == 404
    [line] = [record.getMessage() for record in caplog.records if record.name == "mixnet_cli.access"]
    assert "\n" not in line and "\x1b" not in line
    assert line.startswith('127.0.0.1 "GET /x\\n127.0.0.1 \\"GET /admin\\" 200?q=%0d%0a\\u001b[31m" 404 ')
