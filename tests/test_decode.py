"""Decoding: every file OpenCV reads gives PaddleClas's pixels, because mixnet decodes it with the call PaddleClas
makes (``cv2.imdecode(data, IMREAD_COLOR)``); files only Pillow reads still work; whatever goes wrong with one
input is that input's error, and a run goes on past it; an image URL has a deadline; a directory lists every
file the decoder reads."""

from __future__ import annotations

import http.server
import json
import shutil
import socketserver
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imagegen import DECODE_CORPUS_KINDS, _png_chunk, _with_png_chunk, scene, write_decode_corpus
from mixnet_cli import Classifier
from mixnet_cli.cli import main
from mixnet_cli.base.errors import ImageError, ImageTooLargeError, NotAnImageError, TruncatedImageError
from mixnet_cli.images.inputs import IMAGE_SUFFIXES, directory_images, fetch_image_url
from mixnet_cli.base.manifest import resolve_model
from mixnet_cli.images.preprocess import _to_rgb_like_cv2, decode, load_and_transform

PREPROCESSING = resolve_model("MixNet_S").preprocessing


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_decode_corpus(tmp_path_factory.mktemp("decode-corpus"))


def _opencv_rgb(data: bytes) -> np.ndarray:
    """PaddleClas's DecodeImage: cv2.imdecode(IMREAD_COLOR), then BGR to RGB."""
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None, "OpenCV cannot read this file"
    return bgr[:, :, ::-1]


@pytest.mark.parametrize("kind", DECODE_CORPUS_KINDS)
def test_every_file_opencv_reads_decodes_to_opencvs_pixels(kind: str, corpus: dict[str, Path]) -> None:
    path = corpus[kind]
    want = _opencv_rgb(path.read_bytes())
    assert np.array_equal(decode(path), want)
    assert np.array_equal(decode(path.read_bytes(), "bytes"), want)


@pytest.mark.paddle
@pytest.mark.parametrize("kind", DECODE_CORPUS_KINDS)
def test_network_input_equals_paddleclas_operators_on_every_kind(kind: str, corpus: dict[str, Path]) -> None:
    from paddleclas_reference import paddleclas_decode, paddleclas_transform

    path = corpus[kind]
    theirs = paddleclas_transform(paddleclas_decode(path))
    ours = load_and_transform(path, PREPROCESSING)
    assert ours.dtype == theirs.dtype == np.float32
    assert np.array_equal(ours, theirs), f"{kind}: max difference {np.abs(ours - theirs).max():.3g}"


@pytest.mark.parametrize("kind", ["tiff_cmyk", "bmp_565", "pgm_100", "ppm_4095"])
def test_the_corpus_holds_files_where_pillows_conversion_is_not_opencvs(kind: str, corpus: dict[str, Path]) -> None:
    """These kinds tell a decoder that converts Pillow's pixels from one that is OpenCV: a test that passes with
    either would prove nothing."""
    with Image.open(corpus[kind]) as image:
        through_pillow = _to_rgb_like_cv2(image)
    assert not np.array_equal(through_pillow, decode(corpus[kind]))


def test_a_png_with_a_bad_crc_on_an_optional_chunk_is_read_as_opencv_reads_it(corpus: dict[str, Path]) -> None:
    path = corpus["png_text_bad_crc"]
    with pytest.raises(Exception):
        Image.open(path).load()  # Pillow refuses it; libpng only warns
    assert np.array_equal(decode(path), _opencv_rgb(path.read_bytes()))


@pytest.mark.parametrize("kind", ["jpeg_baseline", "jpeg_progressive", "jpeg_cmyk", "png_rgb", "webp_lossy",
                                  "tiff_rgb", "bmp_24", "ppm_255"])
def test_a_truncated_file_is_an_error_never_grey_pixels(kind: str, corpus: dict[str, Path]) -> None:
    data = corpus[kind].read_bytes()
    with pytest.raises(ImageError) as raised:
        decode(data[: len(data) * 2 // 3], "cut-short")
    message = str(raised.value)
    assert message.startswith("cut-short: ") and "\n" not in message
    if kind.startswith("jpeg"):  # OpenCV 4.6 fills these with grey and says nothing
        assert isinstance(raised.value, TruncatedImageError) and "truncated" in message


def test_files_only_pillow_reads_are_decoded(tmp_path: Path) -> None:
    picture = Image.fromarray(scene(np.random.default_rng(3), 64, 48))
    frames = [picture, Image.fromarray(scene(np.random.default_rng(4), 64, 48))]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=50)
    picture.save(tmp_path / "icon.ico")
    picture.save(tmp_path / "image.tga")
    for name in ("moving.gif", "icon.ico", "image.tga"):
        rgb = decode(tmp_path / name)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    first = np.asarray(Image.open(tmp_path / "image.tga").convert("RGB"))
    assert np.array_equal(decode(tmp_path / "image.tga"), first)


# --- one bad input is that input's error ------------------------------------------------------------------------------

def _png(rgb: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


def _broken_set(directory: Path) -> tuple[list[Path], dict[str, str]]:
    """Good photos mixed with broken files; returns the paths in order and the broken ones' expected error types."""
    import struct
    import zlib

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    png = _png(scene(rng, 96, 64))
    files: dict[str, bytes] = {
        "good1.jpg": b"",
        # A gAMA chunk of 2 bytes (it must have 4), with a valid CRC: Pillow raised ValueError on it.
        "short_gama.png": _with_png_chunk(png, _png_chunk(b"gAMA", b"\x00\x01")),
        # A header that claims 100000 x 100000 pixels.
        "lying_header.png": png[:16] + struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
        + struct.pack(">I", zlib.crc32(b"IHDR" + struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)))
        + png[33:],
        # A damaged critical chunk: IHDR's CRC wrong.
        "bad_ihdr_crc.png": png[:29] + bytes(b ^ 0xFF for b in png[29:33]) + png[33:],
        "garbage_header.ppm": b"P6\nxx yy\n255\n" + bytes(300),
        "good2.png": b"",
        # 1,000,000 x 1: its resize to a short side of 256 would need 196 GB.
        "strip.png": b"",
        "good3.webp": b"",
    }
    paths = []
    for name, data in files.items():
        path = directory / name
        if name.startswith("good"):
            Image.fromarray(scene(rng, 120, 90)).save(path)
        elif name == "strip.png":
            Image.fromarray(np.full((1, 1_000_000), 128, np.uint8)).save(path)
        else:
            path.write_bytes(data)
        paths.append(path)
    expected = {"lying_header.png": "ImageTooLargeError", "bad_ihdr_crc.png": "NotAnImageError",
                "garbage_header.ppm": "NotAnImageError", "strip.png": "ImageTooLargeError"}
    return paths, expected


def test_broken_files_among_good_ones_each_get_their_error_and_every_good_one_is_answered(tmp_path, random_mirror):
    paths, expected = _broken_set(tmp_path / "mixed")
    result = CliRunner().invoke(main, ["classify", *map(str, paths), "--jsonl"])
    assert result.exit_code == 1, result.output
    rows = {Path(row["input"]).name: row for row in map(json.loads, result.stdout.splitlines())}
    assert list(rows) == [p.name for p in paths]
    for name, row in rows.items():
        if name in expected:
            assert row["error"]["type"] == expected[name], row
            assert row["error"]["message"].startswith(str(tmp_path / "mixed" / name))
        else:
            assert len(row["predictions"]) == 5, row  # the good ones, and the PNG whose optional chunk is bad
    assert "elongated" in rows["strip.png"]["error"]["message"]
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr

    # The same through the API: classify_many yields every result; classify raises that input's ImageError.
    classifier = Classifier("S")
    results = list(classifier.classify_many(paths))
    assert [r.ok for r in results] == [p.name not in expected for p in paths]
    for path in paths:
        if path.name in expected:
            with pytest.raises(ImageError):
                classifier.classify(path)


def test_eval_goes_on_past_broken_files(tmp_path, random_mirror):
    paths, expected = _broken_set(tmp_path / "set")
    listing = tmp_path / "val_list.txt"
    listing.write_text("".join(f"set/{p.name} 1\n" for p in paths))
    result = CliRunner().invoke(main, ["eval", "--list", str(listing), "--json"])
    summary = json.loads(result.stdout)
    summary = summary[0] if isinstance(summary, list) else summary
    assert summary["failed"] == len(expected) and summary["images"] == len(paths) - len(expected), result.output


def test_a_strip_too_elongated_to_resize_is_refused_before_the_resize():
    with pytest.raises(ImageTooLargeError, match="elongated"):
        load_and_transform(np.zeros((1, 1_000_000, 3), np.uint8), PREPROCESSING, "strip")
    assert load_and_transform(np.zeros((2, 1000, 3), np.uint8), PREPROCESSING).shape == (3, 224, 224)


def test_odd_objects_are_not_an_image_error_not_a_crash():
    with pytest.raises(NotAnImageError):
        decode(12345)  # type: ignore[arg-type]
    with pytest.raises(NotAnImageError):
        decode(np.zeros((0, 5, 3), np.uint8))


# --- directories list every file the decoder reads --------------------------------------------------------------------

def test_a_directory_lists_every_extension_the_decoder_reads_in_any_case(tmp_path: Path, corpus) -> None:
    picture = Image.fromarray(scene(np.random.default_rng(8), 48, 32))
    folder = tmp_path / "photos"
    folder.mkdir()
    written = []
    for suffix in sorted(IMAGE_SUFFIXES):
        path = folder / f"image{suffix}"
        try:
            picture.save(path)
        except (KeyError, OSError, ValueError):
            continue  # a format Pillow cannot write here: its reading is OpenCV's or another test's business
        written.append(path)
    shutil.copy(corpus["jpeg_baseline"], folder / "UPPER.JPG")
    shutil.copy(corpus["jpeg_baseline"], folder / "photo.MPO")
    (folder / "notes.txt").write_text("not an image")
    (folder / "clip.mpg").write_bytes(b"\x00\x00\x01\xba" + bytes(100))
    written += [folder / "UPPER.JPG", folder / "photo.MPO"]
    assert {".pgm", ".ppm", ".tif", ".webp", ".bmp", ".png"} <= {p.suffix for p in written}
    listed = directory_images(folder)
    assert sorted(listed) == sorted(written)
    for path in listed:
        assert decode(path).shape[2] == 3, path


# --- image URLs: the weights' HTTP layer, and a deadline ---------------------------------------------------------------

class _DrippingHandler(http.server.BaseHTTPRequestHandler):
    """Sends a PNG's headers at once, then its body one byte every ``interval`` seconds: never idle long enough
    for a read timeout."""

    body = b""
    interval = 0.5

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            for index in range(len(self.body)):
                self.wfile.write(self.body[index:index + 1])
                self.wfile.flush()
                time.sleep(self.interval)
        except OSError:
            pass  # the client gave up: as it should

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def dripping_server() -> Iterator[str]:
    _DrippingHandler.body = _png(scene(np.random.default_rng(2), 64, 48))
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _DrippingHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow.png"
    server.shutdown()
    server.server_close()


def test_a_dripping_image_url_fails_at_its_deadline_and_the_run_goes_on(dripping_server, tmp_path, random_mirror,
                                                                         monkeypatch):
    good = tmp_path / "good.jpg"
    Image.fromarray(scene(np.random.default_rng(6), 120, 90)).save(good)
    monkeypatch.setenv("MIXNET_URL_DEADLINE", "2")
    monkeypatch.setenv("MIXNET_TIMEOUT", "30")  # each byte comes well within the read timeout
    started = time.monotonic()
    result = CliRunner().invoke(main, ["classify", dripping_server, str(good), "--jsonl"])
    elapsed = time.monotonic() - started
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 1, result.output
    assert rows[0]["input"] == dripping_server and rows[0]["error"]["type"] == "ImageDownloadError"
    assert "MIXNET_URL_DEADLINE" in rows[0]["error"]["message"] and "2 s" in rows[0]["error"]["message"]
    assert len(rows[1]["predictions"]) == 5
    # Bounded by the deadline, not by the body (hundreds of bytes at 2 a second): a generous bound for a busy machine.
    assert elapsed < 60


def test_image_urls_take_the_size_cap_and_the_api_deadline(dripping_server):
    with pytest.raises(ImageTooLargeError, match="limit"):
        fetch_image_url(dripping_server, max_bytes=10)  # declared length over the cap: refused before the body
    with pytest.raises(ImageError, match="within 0.5 s"):
        fetch_image_url(dripping_server, deadline_s=0.5)


class _GzippingHandler(http.server.BaseHTTPRequestHandler):
    """Answers with the PNG gzip-compressed (Content-Encoding: gzip), whatever the request's Accept-Encoding says:
    some servers and CDNs do."""

    body = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        import gzip

        packed = gzip.compress(self.body)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(packed)))
        self.end_headers()
        self.wfile.write(packed)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_an_image_url_compressed_against_the_request_is_decoded(tmp_path):
    """The bytes are the image's, not the gzip stream's; the size cap counts the decoded bytes."""
    image = scene(np.random.default_rng(3), 64, 48)
    _GzippingHandler.body = _png(image)
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _GzippingHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/packed.png"
        assert fetch_image_url(url) == _GzippingHandler.body
        with pytest.raises(ImageTooLargeError, match="limit"):
            fetch_image_url(url, max_bytes=len(_GzippingHandler.body) - 1)
    finally:
        server.shutdown()
        server.server_close()


# --- inputs that would block, and files OpenCV refuses --------------------------------------------------------------

def test_a_named_pipe_is_an_error_never_a_hang(tmp_path, random_mirror):
    import os

    good = tmp_path / "photos" / "good.jpg"
    good.parent.mkdir()
    Image.fromarray(scene(np.random.default_rng(12), 120, 90)).save(good)
    os.mkfifo(tmp_path / "photos" / "pipe.jpg")
    os.mkfifo(tmp_path / "pipe.png")
    # Given by name: an error row; inside a directory: not listed. Neither blocks the run.
    result = CliRunner().invoke(main, ["classify", str(tmp_path / "pipe.png"), str(tmp_path / "photos"), "--jsonl"])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 1
    assert rows[0]["error"]["type"] == "NotAnImageError" and "named pipe" in rows[0]["error"]["message"]
    assert [Path(row["input"]).name for row in rows[1:]] == ["good.jpg"] and "predictions" in rows[1]
    with pytest.raises(NotAnImageError, match="not a regular file"):
        decode(tmp_path / "pipe.png")  # the API, too, refuses before opening it


def test_a_png_missing_rows_is_truncated_not_filled_with_black(corpus):
    import struct
    import zlib

    rgb = scene(np.random.default_rng(13), 64, 48)
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(24))  # half the rows, each with filter byte 0
    header = struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw))
           + _png_chunk(b"IEND", b""))
    with pytest.raises(TruncatedImageError, match="PNG file is truncated or damaged"):
        decode(png, "half.png")


class _SlowHeadersHandler(http.server.BaseHTTPRequestHandler):
    """Drips the status line and headers, a byte at a time: never idle long enough for a read timeout."""

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
            return
        head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Slow-%d: %s\r\n" % (i, b"a" * 20) for i in range(200))
        try:
            for index in range(len(head)):
                self.wfile.write(head[index:index + 1])
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_server_dripping_its_headers_is_cut_off_at_the_deadline_and_loops_are_not_retried():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SlowHeadersHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        started = time.monotonic()
        with pytest.raises(ImageError, match="within 1 s"):
            fetch_image_url(f"{base}/slow.png", deadline_s=1)
        assert time.monotonic() - started < 10  # the headers alone would take 200+ s
        started = time.monotonic()
        with pytest.raises(ImageError, match="TooManyRedirects"):
            fetch_image_url(f"{base}/loop", deadline_s=30)
        assert time.monotonic() - started < 10  # no retries with backoff for what cannot pass
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreadable_folder_is_named_not_skipped(tmp_path, random_mirror):
    import os

    photos = tmp_path / "photos"
    (photos / "locked").mkdir(parents=True)
    Image.fromarray(scene(np.random.default_rng(14), 120, 90)).save(photos / "locked" / "inside.jpg")
    Image.fromarray(scene(np.random.default_rng(15), 120, 90)).save(photos / "open.jpg")
    os.chmod(photos / "locked", 0)
    try:
        if os.access(photos / "locked", os.R_OK):
            pytest.skip("running as root: permissions do not stop reading here")
        result = CliRunner().invoke(main, ["classify", str(photos), "--jsonl"])
    finally:
        os.chmod(photos / "locked", 0o755)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 1
    assert rows[0]["error"]["type"] == "ImageUnreadableError" and "locked" in rows[0]["input"]
    assert "predictions" in rows[1]
