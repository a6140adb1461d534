"""Shared fixtures: an isolated cache, real weights files, and a real HTTP server on 127.0.0.1 that serves them."""

from __future__ import annotations

import http.server
import threading
from functools import partial
from pathlib import Path
from typing import Iterator

import pytest

MIXNET_VARIABLES = (
    "MIXNET_HOME", "MIXNET_MIRROR", "MIXNET_OFFLINE", "MIXNET_DEVICE", "MIXNET_ENGINE", "MIXNET_DEBUG", "MIXNET_TIMEOUT",
    "MIXNET_RETRIES", "MIXNET_BACKOFF", "MIXNET_BACKOFF_MAX", "MIXNET_URL_DEADLINE", "MIXNET_VERIFY",
    # Read as the default thread count; `import paddle` (in the reference tests) sets it to 1 for the process.
    "OMP_NUM_THREADS",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``paddle`` compare with paddleclas itself: without the [paddle] extra they are skipped, saying
    why (the core suite runs everything else)."""
    from mixnet_cli.base.third_party import paddle_missing

    missing = paddle_missing()
    if missing is None:
        return
    skip = pytest.mark.skip(reason=f"needs the [paddle] extra; not installed: {missing}")
    for item in items:
        if "paddle" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache and none of the user's MIXNET_* settings (nor OMP_NUM_THREADS)."""
    for name in MIXNET_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "mixnet-home"
    monkeypatch.setenv("MIXNET_HOME", str(home))
    return home


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


class FileServer:
    """A real threaded HTTP server on 127.0.0.1 serving one directory; counts the requests it answers."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.requests: list[str] = []
        server = self

        class Handler(_QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                super().do_GET()

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(directory)))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture(scope="session")
def random_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MixNet_S weights in the real file format (every parameter name and shape of the architecture, freshly
    initialised, pickled as ``paddle.save`` does).

    Enough for download and cache tests; predictions from them are near-uniform, so tests of answers use
    the calibrated weights instead.
    """
    from weightgen import make_random_weights

    directory = tmp_path_factory.mktemp("random-weights")
    make_random_weights("MixNet_S", directory / "MixNet_S_pretrained.pdparams")
    return directory


@pytest.fixture
def file_server() -> Iterator[type[FileServer]]:
    """A factory: ``file_server(directory)`` starts a server for ``directory``; all are stopped after the test."""
    started: list[FileServer] = []

    def start(directory: Path) -> FileServer:
        server = FileServer(directory)
        started.append(server)
        return server

    yield start  # type: ignore[misc]
    for server in started:
        server.close()


@pytest.fixture
def random_mirror(random_weights_dir: Path, file_server, monkeypatch: pytest.MonkeyPatch) -> FileServer:
    """A local mirror serving the random MixNet_S weights, set as MIXNET_MIRROR."""
    return _mirror(file_server(random_weights_dir), monkeypatch)


def _mirror(server: FileServer, monkeypatch: pytest.MonkeyPatch) -> FileServer:
    monkeypatch.setenv("MIXNET_MIRROR", server.url)
    return server


class CalibratedWeights:
    """Calibrated weights (see ``weightgen``): ``calibrated_weights("MixNet_M")`` makes that model's file on
    first use and returns its path; all files sit in one ``directory`` under their released names."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._made: dict[str, Path] = {}

    def __call__(self, model_name: str = "MixNet_S") -> Path:
        if model_name not in self._made:
            from weightgen import make_calibrated_weights

            path = self.directory / f"{model_name}_pretrained.pdparams"
            self._made[model_name] = make_calibrated_weights(model_name, path)
        return self._made[model_name]


@pytest.fixture(scope="session")
def calibrated_weights(tmp_path_factory: pytest.TempPathFactory) -> CalibratedWeights:
    """A factory of weights that answer like trained ones (confident, different per picture), made lazily:
    MixNet_S takes a few seconds, M and L longer, each once per session."""
    return CalibratedWeights(tmp_path_factory.mktemp("calibrated-weights"))


@pytest.fixture(scope="session")
def calibrated_weights_dir(calibrated_weights: CalibratedWeights) -> Path:
    """The directory holding calibrated MixNet_S weights (``MixNet_S_pretrained.pdparams``); M and L appear in it
    once ``calibrated_weights`` has made them."""
    calibrated_weights("MixNet_S")
    return calibrated_weights.directory


@pytest.fixture(scope="session")
def calibrated_server(calibrated_weights_dir: Path) -> Iterator[FileServer]:
    """One server for the whole session over the calibrated weights, for module-scoped fixtures; its request
    log is shared, so tests that count requests use ``calibrated_mirror``."""
    server = FileServer(calibrated_weights_dir)
    yield server
    server.close()


@pytest.fixture
def calibrated_mirror(calibrated_weights_dir: Path, file_server, monkeypatch: pytest.MonkeyPatch) -> FileServer:
    """A local mirror serving the calibrated weights, set as MIXNET_MIRROR."""
    return _mirror(file_server(calibrated_weights_dir), monkeypatch)


@pytest.fixture(scope="session")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One generated picture of every file kind and pixel format (see ``imagegen.write_test_images``), by kind.

    Shared by the session: copy a file before changing it.
    """
    from imagegen import write_test_images

    return write_test_images(tmp_path_factory.mktemp("test-images"))
