"""Downloads that survive faults, bad files and hostile files: through the real `mixnet` command, against a real
local server that misbehaves on demand (tests/faulty_server.py). Each test checks what the user sees (exit code,
a one-line `Error: ...`, no traceback) and what the cache holds afterwards (never a partial or unverified file
under the weights name)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner, Result

from faulty_server import Fault, FaultyServer
from mixnet_cli.cli import main
from mixnet_cli.base.http import parse_retry_after, retry_delay
from mixnet_cli.base.errors import WeightsError
from mixnet_cli.base.manifest import resolve_model
from mixnet_cli.weights.pdparams import read_state_dict

FILE = "MixNet_S_pretrained.pdparams"
PATH = "/" + FILE
LOCK = FILE + ".lock"
PARTIAL = FILE + ".part"
PARTIAL_INFO = PARTIAL + ".json"


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two retries, no waiting between them, and a timeout no healthy local transfer comes near."""
    monkeypatch.setenv("MIXNET_RETRIES", "2")
    monkeypatch.setenv("MIXNET_BACKOFF", "0")
    monkeypatch.setenv("MIXNET_BACKOFF_MAX", "0")
    monkeypatch.setenv("MIXNET_TIMEOUT", "20")


@pytest.fixture(scope="session")
def weights_bytes(random_weights_dir: Path) -> bytes:
    return (random_weights_dir / FILE).read_bytes()


@pytest.fixture(scope="session")
def other_weights_bytes(weights_bytes: bytes) -> bytes:
    """A second valid MixNet_S file with other values: what the server has after the file changed."""
    state = read_state_dict(weights_bytes)
    key = sorted(state)[0]
    state[key] = state[key] + 1
    return pickle.dumps(state, protocol=4)


@pytest.fixture
def servers() -> Iterator[list[FaultyServer]]:
    started: list[FaultyServer] = []
    yield started
    for server in started:
        server.close()


@pytest.fixture
def server(weights_bytes: bytes, servers: list[FaultyServer]) -> FaultyServer:
    started = FaultyServer({PATH: weights_bytes})
    servers.append(started)
    return started


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def download(server: FaultyServer, *extra: str) -> Result:
    return run("download", "S", "--mirror", server.url, *extra)


def names(home: Path) -> set[str]:
    directory = home / "weights"
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


def assert_error(result: Result, *fragments: str) -> str:
    """Exit 1, nothing on stdout, no traceback, and a last stderr line `Error: ...` holding ``fragments``."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def assert_installed(home: Path, content: bytes) -> None:
    assert (home / "weights" / FILE).read_bytes() == content
    record = json.loads((home / "weights" / (FILE + ".json")).read_text())
    assert (record["sha256"], record["size"]) == (sha(content), len(content))
    assert names(home) <= {FILE, FILE + ".json"}, names(home)  # the lock file went with its holder


def assert_nothing_installed(home: Path, *, partial: bool = False, lock: bool = False) -> None:
    """No weights file; only a partial download to resume if ``partial``, and no lock file unless ``lock`` (a
    process killed while holding it cannot delete it)."""
    allowed = ({PARTIAL, PARTIAL_INFO} if partial else set()) | ({LOCK} if lock else set())
    assert names(home) <= allowed, names(home)


# --- resuming --------------------------------------------------------------------------------------------------

def test_dropped_connection_resumes_with_range_and_if_range(server, isolated_home, weights_bytes):
    server.faults.append(Fault(drop_after=300_000))
    result = download(server)
    assert result.exit_code == 0, result.output
    first, second = server.file_requests(PATH)
    assert first.range is None and first.sent == 300_000
    assert second.range == "bytes=300000-" and second.if_range == first_etag(server)
    assert second.status == 206 and second.sent == len(weights_bytes) - 300_000
    assert "retrying" in result.stderr
    assert_installed(isolated_home, weights_bytes)


def first_etag(server: FaultyServer) -> str:
    return server._files[PATH].etag


def test_a_connection_that_keeps_dropping_gives_up_then_the_next_run_resumes(server, isolated_home, weights_bytes):
    server.always = Fault(drop_after=100_000)
    result = download(server)
    assert_error(result, "broke off", "gave up after 3 attempts", "run the same command again to resume",
                 "300000 bytes kept")
    assert_nothing_installed(isolated_home, partial=True)
    assert (isolated_home / "weights" / PARTIAL).stat().st_size == 300_000
    assert [r.range for r in server.file_requests(PATH)] == [None, "bytes=100000-", "bytes=200000-"]

    server.always = Fault()
    again = download(server)
    assert again.exit_code == 0, again.output
    last = server.file_requests(PATH)[-1]
    assert last.range == "bytes=300000-" and last.sent == len(weights_bytes) - 300_000
    assert_installed(isolated_home, weights_bytes)


def test_a_download_says_so_in_one_line_without_a_terminal_and_so_does_a_resumed_one(server, isolated_home,
                                                                                      weights_bytes):
    """CliRunner's stderr is not a terminal (no progress bar): the one notice line is all a log shows."""
    megabytes = f"{len(weights_bytes) / 1e6:.1f} MB"
    server.faults.append(Fault(drop_after=300_000))
    result = run("download", "S", "--mirror", server.url)
    assert result.exit_code == 0, result.output
    url = f"{server.url}{PATH}"
    notices = [line for line in result.stderr.splitlines() if line.startswith("mixnet: ") and "weights" in line]
    assert notices[0] == f"mixnet: downloading MixNet_S weights ({megabytes}) from {url}"
    assert f"mixnet: resuming the download of MixNet_S weights at 0.3 of {megabytes} from {url}" in notices
    assert "MixNet_S: downloaded (resumed) /" in result.stderr

    # Cached: no download line at all.
    again = run("download", "S", "--mirror", server.url)
    assert again.exit_code == 0 and "downloading" not in again.stderr and "MixNet_S: cached /" in again.stderr


def test_a_server_that_ignores_range_restarts_the_file_from_zero(server, isolated_home, weights_bytes):
    server.faults += [Fault(drop_after=200_000), Fault(ignore_range=True)]
    result = download(server)
    assert result.exit_code == 0, result.output
    second = server.file_requests(PATH)[1]
    assert second.range == "bytes=200000-" and second.status == 200 and second.sent == len(weights_bytes)
    assert_installed(isolated_home, weights_bytes)  # not the first 200000 bytes twice


def test_a_206_at_the_wrong_offset_restarts_the_file_from_zero(server, isolated_home, weights_bytes):
    server.faults += [Fault(drop_after=200_000), Fault(wrong_offset=150_000)]
    result = download(server)
    assert result.exit_code == 0, result.output
    ranges = [r.range for r in server.file_requests(PATH)]
    assert ranges == [None, "bytes=200000-", None]
    assert "wrong offset" in result.stderr
    assert_installed(isolated_home, weights_bytes)


@pytest.mark.parametrize("validator", ["etag", "last-modified"])
def test_a_file_that_changed_between_requests_comes_back_whole(
    validator, weights_bytes, other_weights_bytes, isolated_home, servers
):
    server = FaultyServer({PATH: weights_bytes}, etag=validator == "etag", last_modified=validator == "last-modified")
    servers.append(server)
    server.faults.append(Fault(drop_after=400_000, after=lambda: server.put(PATH, other_weights_bytes)))
    result = download(server)
    assert result.exit_code == 0, result.output
    first, second = server.file_requests(PATH)
    assert second.range == "bytes=400000-" and second.if_range is not None
    assert second.status == 200, "a stale If-Range must bring the whole new file"
    assert_installed(isolated_home, other_weights_bytes)


def test_a_partial_file_without_its_validator_is_not_resumed(server, isolated_home, weights_bytes):
    weights = isolated_home / "weights"
    weights.mkdir(parents=True)
    (weights / PARTIAL).write_bytes(b"left by something else" * 100)
    result = download(server)
    assert result.exit_code == 0, result.output
    assert server.file_requests(PATH)[0].range is None
    assert_installed(isolated_home, weights_bytes)


def test_a_completely_downloaded_but_unchecked_partial_is_finished_without_downloading_again(
    server, isolated_home, weights_bytes
):
    # A run killed while checking the file leaves all of it in the partial file: the server answers 416.
    weights = isolated_home / "weights"
    weights.mkdir(parents=True)
    (weights / PARTIAL).write_bytes(weights_bytes)
    version = server._files[PATH]
    (weights / PARTIAL_INFO).write_text(json.dumps(
        {"url": f"{server.url}{PATH}", "etag": version.etag, "last_modified": None, "total": len(weights_bytes)}
    ))
    result = download(server)
    assert result.exit_code == 0, result.output
    (request,) = server.file_requests(PATH)
    assert request.status == 416 and request.sent == 0
    assert_installed(isolated_home, weights_bytes)


def test_leftover_temporary_files_of_killed_runs_are_cleaned(server, isolated_home, weights_bytes):
    weights = isolated_home / "weights"
    weights.mkdir(parents=True)
    stale = [weights / f".{FILE}.4242.abcd0123.tmp", weights / f".{FILE}.4242.ffff.incomplete"]
    for path in stale:
        path.write_bytes(weights_bytes[:1000])
    mine = weights / "notes.txt"
    mine.write_text("not ours")
    result = download(server)
    assert result.exit_code == 0, result.output
    assert not any(path.exists() for path in stale)
    assert mine.read_text() == "not ours"


# --- retries ---------------------------------------------------------------------------------------------------

def test_server_errors_are_retried_then_succeed(server, isolated_home, weights_bytes):
    server.faults += [Fault(status=500), Fault(status=503)]
    result = download(server)
    assert result.exit_code == 0, result.output
    assert [r.status for r in server.file_requests(PATH)] == [500, 503, 200]
    assert "HTTP 500" in result.stderr and "attempt 2 of 3" in result.stderr and "attempt 3 of 3" in result.stderr
    assert_installed(isolated_home, weights_bytes)


def test_429_with_retry_after_is_retried_within_the_cap(server, isolated_home, weights_bytes, monkeypatch):
    monkeypatch.setenv("MIXNET_BACKOFF_MAX", "0.05")
    server.faults += [Fault(status=429, retry_after="3600"), Fault(status=429, retry_after="0")]
    result = download(server)
    assert result.exit_code == 0, result.output
    assert "HTTP 429" in result.stderr and "retrying in 0.05s" in result.stderr  # 3600 s capped at 0.05
    assert_installed(isolated_home, weights_bytes)


def test_server_errors_to_the_end_give_one_line(server, isolated_home):
    server.always = Fault(status=503)
    result = download(server)
    assert_error(result, "HTTP 503", "gave up after 3 attempts", "try again later")
    assert len(server.file_requests(PATH)) == 3
    assert_nothing_installed(isolated_home)


def test_not_found_is_not_retried(server, isolated_home):
    result = run("download", "S", "--mirror", server.url + "/elsewhere")
    assert_error(result, "HTTP 404", "/elsewhere/" + FILE)
    assert len(server.requests) == 1
    assert_nothing_installed(isolated_home)


def test_the_lock_file_goes_with_its_holder_after_a_failure_and_after_a_success(server, isolated_home, weights_bytes):
    lock = isolated_home / "weights" / LOCK
    assert_error(run("download", "S", "--mirror", server.url + "/elsewhere"), "HTTP 404")
    assert (isolated_home / "weights").is_dir() and not lock.exists()
    server.faults.append(Fault(body=b"<!DOCTYPE html><html>Access denied</html>"))
    assert_error(download(server), "is a web page", "deleted the download")
    assert not lock.exists()
    assert download(server).exit_code == 0
    assert not lock.exists()
    assert_installed(isolated_home, weights_bytes)


def test_a_server_too_slow_to_answer_times_out(server, isolated_home, monkeypatch):
    monkeypatch.setenv("MIXNET_TIMEOUT", "0.2")
    monkeypatch.setenv("MIXNET_RETRIES", "1")
    server.always = Fault(delay=10)
    result = download(server)
    assert_error(result, "no answer for 0.2s", "MIXNET_TIMEOUT", "gave up after 2 attempts")
    assert_nothing_installed(isolated_home)


def test_a_transfer_that_stalls_times_out_and_keeps_what_arrived(server, isolated_home, weights_bytes, monkeypatch):
    monkeypatch.setenv("MIXNET_TIMEOUT", "0.3")
    monkeypatch.setenv("MIXNET_RETRIES", "0")
    server.faults.append(Fault(stall_after=500_000))
    result = download(server)
    assert_error(result, "broke off after 500000 bytes", "no answer for 0.3s", "500000 bytes kept")
    assert_nothing_installed(isolated_home, partial=True)
    server.gate.set()
    assert download(server).exit_code == 0
    assert server.file_requests(PATH)[-1].range == "bytes=500000-"
    assert_installed(isolated_home, weights_bytes)


def test_backoff_doubles_and_respects_the_cap_and_retry_after():
    assert [retry_delay(n, None, 1.0, 30.0) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 16, 30]
    assert retry_delay(1, 120.0, 1.0, 30.0) == 30.0
    assert retry_delay(3, 0.0, 1.0, 30.0) == 0.0
    assert retry_delay(3, None, 0.0, 30.0) == 0.0
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    from datetime import datetime, timezone

    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("Mon, 01 Jan 2024 12:00:42 GMT", now=now) == 42.0


# --- bad and hostile files -------------------------------------------------------------------------------------

def test_an_html_page_served_with_200_is_rejected(server, isolated_home):
    server.always = Fault(html=True)
    result = download(server)
    assert_error(result, "served a web page (text/html)", "not a weights file")
    assert len(server.requests) == 1, "a web page is not retried"
    assert_nothing_installed(isolated_home)


def _bad_bodies(weights: bytes) -> dict[str, tuple[bytes, str]]:
    state = read_state_dict(weights)
    return {
        "html-as-octet-stream": (b"<!DOCTYPE html><html><body>Access denied</body></html>", "is a web page"),
        "error-json": (b'{"code": "SignatureDoesNotMatch", "message": "expired"}', "is a JSON document"),
        "random-bytes": (random.Random(0).randbytes(len(weights)), "is not a pickled state dict (.pdparams)"),
        "truncated": (weights[: len(weights) - 4096], "is truncated"),
        "padded": (weights + b"\x00" * 4096, "extra bytes follow the end of its data"),
        "other-model": (pickle.dumps({"fc.weight": state[sorted(state)[0]]}, protocol=4),
                        "does not hold MixNet_S weights"),
    }


@pytest.mark.parametrize(
    "kind", ["html-as-octet-stream", "error-json", "random-bytes", "truncated", "padded", "other-model"]
)
def test_a_file_that_is_not_the_weights_is_deleted_not_cached(kind, server, isolated_home, weights_bytes):
    body, reason = _bad_bodies(weights_bytes)[kind]
    server.always = Fault(body=body)
    result = download(server)
    line = assert_error(result, server.url, reason, "deleted the download")
    assert len(line) < 400
    assert_nothing_installed(isolated_home)
    assert len(server.requests) == 1, "a bad file is not fetched again"


def test_a_hostile_pickle_from_the_server_never_runs(server, isolated_home, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    server.always = Fault(body=pickle.dumps({"w": Payload()}, protocol=4))
    result = download(server)
    assert_error(result, "refuses to load", "system", "deleted the download")
    assert not marker.exists()
    assert_nothing_installed(isolated_home)


def test_a_body_far_larger_than_the_weights_is_refused_before_it_fills_the_disk(server, isolated_home):
    server.always = Fault(declared_length=10**10)
    result = download(server)
    assert_error(result, "10000000000 bytes, far more than these weights can be")
    assert_nothing_installed(isolated_home)


def test_a_pinned_sha256_that_does_not_match_deletes_the_download(server, isolated_home, weights_bytes):
    wrong = "0" * 64
    result = download(server, "--sha256", wrong)
    assert_error(result, f"not the pinned {wrong}", "deleted the download")
    assert_nothing_installed(isolated_home)
    result = download(server, "--sha256", sha(weights_bytes).upper())
    assert result.exit_code == 0, result.output
    assert_installed(isolated_home, weights_bytes)
    # the cached file is now checked against a pin too
    assert_error(download(server, "--sha256", wrong), "have sha256", f"not the pinned {wrong}")
    assert "is not a sha256" in download(server, "--sha256", "abc").stderr


def test_published_sha256_and_size_in_the_manifest_are_enforced(server, isolated_home, weights_bytes):
    from mixnet_cli.weights.store import ensure_weights

    spec = resolve_model("S")
    for bad in (dataclasses.replace(spec, sha256="f" * 64), dataclasses.replace(spec, size=len(weights_bytes) + 1)):
        with pytest.raises(WeightsError, match="but MixNet_S weights have"):
            ensure_weights(bad, mirrors=[server.url], progress=False)
        assert_nothing_installed(isolated_home)
    good = dataclasses.replace(spec, sha256=sha(weights_bytes), size=len(weights_bytes))
    assert ensure_weights(good, mirrors=[server.url], progress=False).record.sha256 == sha(weights_bytes)
    assert ensure_weights(spec, sha256=sha(weights_bytes), offline=True).path == isolated_home / "weights" / FILE


# --- mirrors ---------------------------------------------------------------------------------------------------

def test_the_next_mirror_is_tried_when_one_fails(server, servers, isolated_home, weights_bytes, monkeypatch):
    broken = FaultyServer({PATH: weights_bytes})
    broken.always = Fault(html=True)
    servers.append(broken)
    result = run("download", "S", "--mirror", broken.url, "--mirror", server.url)
    assert result.exit_code == 0, result.output
    assert "trying the next mirror" in result.stderr
    assert_installed(isolated_home, weights_bytes)

    # MIXNET_MIRROR, commas and spaces
    run("cache", "rm", "S")
    monkeypatch.setenv("MIXNET_MIRROR", f"{server.url}/missing, {server.url}")
    result = run("download", "S")
    assert result.exit_code == 0, result.output
    assert [r.path for r in server.requests[-2:]] == ["/missing" + PATH, PATH]


def _closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_a_mirror_that_does_not_answer_gives_way_at_once_and_the_last_one_is_retried(
        server, isolated_home, weights_bytes, monkeypatch):
    import time

    dead = _closed_port_url()
    started = time.monotonic()
    result = run("download", "S", "--mirror", dead, "--mirror", server.url)
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert "connection refused" in result.stderr and "trying the next mirror" in result.stderr
    assert "retrying" not in result.stderr  # no backoff on a mirror that is not there: the default waits 15 s
    assert elapsed < 10, elapsed
    assert_installed(isolated_home, weights_bytes)

    # The last source (or the only one) still gets its retries: the network may be coming back.
    run("cache", "rm", "S")
    monkeypatch.setenv("MIXNET_RETRIES", "1")
    monkeypatch.setenv("MIXNET_BACKOFF", "0")
    result = run("download", "S", "--mirror", server.url, "--mirror", dead)
    assert result.exit_code == 0  # the first mirror is good
    only_dead = run("download", "M", "--mirror", dead)
    assert_error(only_dead, "connection refused", "gave up after 2 attempts")
    assert "retrying in 0s (attempt 2 of 2)" in only_dead.stderr


def _unresolvable_host() -> str:
    """A host under .invalid (RFC 6761: never resolves); skip where this machine's resolver is slow to say so."""
    import socket

    host = "weights.mixnet.invalid"
    started = time.monotonic()
    try:
        socket.getaddrinfo(host, 80)
    except socket.gaierror:
        pass
    if time.monotonic() - started > 0.3:
        pytest.skip("this machine's resolver takes long to fail a .invalid name")
    return host


def test_an_unknown_host_is_not_retried_and_the_error_says_what_to_do(server, isolated_home, weights_bytes,
                                                                     monkeypatch):
    monkeypatch.setenv("MIXNET_RETRIES", "5")  # the default: with its backoff, 16 s of waiting on a dead name
    monkeypatch.setenv("MIXNET_BACKOFF", "1")
    monkeypatch.setenv("MIXNET_BACKOFF_MAX", "8")
    unknown = f"http://{_unresolvable_host()}"
    started = time.monotonic()
    result = run("download", "S", "--mirror", unknown)
    elapsed = time.monotonic() - started
    line = assert_error(result, f"unknown host {unknown[7:]}", "--mirror URL", "MIXNET_OFFLINE=1",
                        "`mixnet download S --from FILE`")
    assert "retrying" not in result.stderr and "gave up after" not in line
    assert elapsed < 1, elapsed
    assert_nothing_installed(isolated_home)

    # With a mirror after it, the next one is tried at once.
    started = time.monotonic()
    result = run("download", "S", "--mirror", unknown, "--mirror", server.url)
    assert result.exit_code == 0, result.output
    assert "unknown host" in result.stderr and "trying the next mirror" in result.stderr
    assert "retrying" not in result.stderr and time.monotonic() - started < 5
    assert_installed(isolated_home, weights_bytes)


def test_an_image_url_on_an_unknown_host_fails_at_once(monkeypatch):
    from mixnet_cli.base.errors import UnknownHostError
    from mixnet_cli.base.http import fetch_bytes

    monkeypatch.setenv("MIXNET_RETRIES", "5")
    monkeypatch.setenv("MIXNET_BACKOFF", "1")
    url = f"http://{_unresolvable_host()}/cat.jpg"
    started = time.monotonic()
    with pytest.raises(UnknownHostError, match="unknown host weights.mixnet.invalid"):
        fetch_bytes(url, max_bytes=1 << 20)
    assert time.monotonic() - started < 1


def test_when_every_mirror_fails_one_line_names_each(servers, isolated_home, weights_bytes):
    first, second = FaultyServer({PATH: weights_bytes}), FaultyServer({})
    servers += [first, second]
    first.always = Fault(status=502)
    result = run("download", "S", "--mirror", first.url, "--mirror", second.url)
    assert_error(result, "no source gave valid MixNet_S weights", "HTTP 502", "HTTP 404", " | ")
    assert_nothing_installed(isolated_home)


# --- offline, --from, --force, the cached file -------------------------------------------------------------------

def test_offline_uses_the_cache_and_never_the_network(server, isolated_home, weights_bytes, monkeypatch):
    assert download(server).exit_code == 0
    monkeypatch.setenv("MIXNET_OFFLINE", "1")
    before = len(server.requests)
    assert download(server).exit_code == 0
    assert run("download", "S", "--offline").exit_code == 0
    assert len(server.requests) == before


def test_offline_with_nothing_cached_says_how_to_get_the_weights(server, isolated_home, weights_bytes):
    # a partial download is not weights, even when all of it is there
    (isolated_home / "weights").mkdir(parents=True)
    (isolated_home / "weights" / PARTIAL).write_bytes(weights_bytes)
    result = run("download", "S", "--offline", "--mirror", server.url)
    assert_error(result, "offline mode is on", "mixnet download S", "--from FILE")
    assert server.requests == []
    from PIL import Image

    photo = isolated_home.parent / "photo.png"  # an image that exists: a missing one fails before any model
    Image.new("RGB", (64, 48), (90, 160, 30)).save(photo)
    result = run("classify", "--offline", "--mirror", server.url, str(photo))
    assert_error(result, "offline mode is on")
    assert server.requests == []


def test_from_file_installs_a_copy_and_leaves_the_users_file_alone(tmp_path, isolated_home, weights_bytes, monkeypatch):
    monkeypatch.setenv("MIXNET_OFFLINE", "1")  # no network needed
    mine = tmp_path / "downloads" / FILE
    mine.parent.mkdir()
    mine.write_bytes(weights_bytes)
    result = run("download", "S", "--from", str(mine))
    assert result.exit_code == 0, result.output
    assert "installed" in result.stderr
    assert mine.read_bytes() == weights_bytes
    assert_installed(isolated_home, weights_bytes)
    record = json.loads((isolated_home / "weights" / (FILE + ".json")).read_text())
    assert record["source"] == f"file:{mine.resolve()}"
    # a directory holding the file works too, and a wrong file is refused without touching it or the cache
    assert run("download", "S", "--from", str(mine.parent)).exit_code == 0
    bad = tmp_path / "bad.pdparams"
    bad.write_bytes(weights_bytes[:-100])
    assert_error(run("download", "S", "--from", str(bad), "--force"), str(bad), "nothing was installed")
    assert bad.read_bytes() == weights_bytes[:-100]
    assert_installed(isolated_home, weights_bytes)
    assert run("download", "S", "--from", str(tmp_path / "nope")).exit_code == 2
    # a named pipe is there but is no file: said so, not "no such file" (and not read: it would wait for a writer)
    pipe = tmp_path / "pipe.pdparams"
    os.mkfifo(pipe)
    piped = run("download", "S", "--from", str(pipe), "--force")
    assert piped.exit_code == 2 and "is a named pipe, not a regular file" in piped.stderr
    assert "no such file" not in piped.stderr
    assert_installed(isolated_home, weights_bytes)


def test_force_downloads_again(server, isolated_home, weights_bytes):
    assert download(server).exit_code == 0
    assert download(server).exit_code == 0
    assert len(server.file_requests(PATH)) == 1
    assert download(server, "--force").exit_code == 0
    assert len(server.file_requests(PATH)) == 2
    assert_installed(isolated_home, weights_bytes)


def test_a_cached_file_that_changed_is_downloaded_again_unless_offline(server, isolated_home, weights_bytes):
    assert download(server).exit_code == 0
    path = isolated_home / "weights" / FILE
    path.write_bytes(weights_bytes[:-1] + b"\x00")
    assert_error(download(server, "--offline"), "are corrupt", "mixnet download S --force")
    repaired = download(server)
    assert repaired.exit_code == 0, repaired.output
    assert "are corrupt" in repaired.stderr and "downloading them again" in repaired.stderr
    assert "MixNet_S: downloaded " in repaired.stderr
    assert len(server.file_requests(PATH)) == 2
    assert_installed(isolated_home, weights_bytes)
    assert "MixNet_S: cached " in download(server).stderr


# --- full disk ---------------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MB tmpfs needs root (the RLIMIT_FSIZE test covers a full disk without it)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_is_a_clear_error_and_leaves_nothing_behind(server, tiny_disk, monkeypatch):
    monkeypatch.setenv("MIXNET_HOME", str(tiny_disk))
    result = download(server)
    assert_error(result, "No space left on device", "free some disk space", "nothing was installed")
    assert_nothing_installed(tiny_disk)


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXNET_")}
    env.update(MIXNET_HOME=str(home), MIXNET_RETRIES="2", MIXNET_BACKOFF="0", MIXNET_BACKOFF_MAX="0", **extra)
    return env


def _mixnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "mixnet_cli", *args]


def test_a_file_size_limit_is_a_clear_error_and_leaves_nothing_behind(server, isolated_home):
    done = subprocess.run(
        _mixnet("download", "S", "--mirror", server.url), env=_env(isolated_home),
        preexec_fn=_limit_file_size, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: cannot write") and "File too large" in last and "nothing was installed" in last
    assert_nothing_installed(isolated_home)


# --- real processes: interrupted, killed, and several at once ----------------------------------------------------

def _wait_for(condition, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_an_interrupted_or_killed_download_resumes_on_the_next_run(how, server, isolated_home, weights_bytes):
    server.faults.append(Fault(stall_after=600_000))
    partial = isolated_home / "weights" / PARTIAL
    process = subprocess.Popen(
        _mixnet("download", "S", "--mirror", server.url), env=_env(isolated_home),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # As from a terminal: a shell that starts the test run in the background has SIGINT ignored, which the
        # child would inherit (and then rightly ignore Ctrl-C).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        _wait_for(lambda: _size(partial) == 600_000, "the first 600000 bytes")
        process.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
            pytest.fail(f"still running 60 s after {how}; its stderr: {stderr[-2000:]!r}")
    finally:
        process.kill()
    if how == "ctrl-c":
        assert process.returncode == 130 and stderr.strip().splitlines()[-1] == "Interrupted."
        assert "Traceback" not in stderr
    else:
        assert process.returncode == -signal.SIGKILL
    # Ctrl-C lets go of the lock, deleting its file; a killed process leaves it (unheld) for the next run to take.
    assert_nothing_installed(isolated_home, partial=True, lock=how == "kill")
    assert (isolated_home / "weights" / LOCK).exists() == (how == "kill")
    assert _size(partial) == 600_000

    server.gate.set()
    result = download(server)
    assert result.exit_code == 0, result.output
    last = server.file_requests(PATH)[-1]
    assert last.range == "bytes=600000-" and last.if_range is not None and last.sent == len(weights_bytes) - 600_000
    assert_installed(isolated_home, weights_bytes)


@pytest.mark.parametrize("command", ["classify", "serve"])
def test_ctrl_c_while_classify_or_serve_downloads_leaves_no_lock_file(command, server, isolated_home, tmp_path):
    """classify ends at once on Ctrl-C (os._exit, no releases), and serve stops while its loader thread is still
    downloading: both delete the files of the locks they hold on the way out; the partial download stays."""
    if command == "serve":
        from mixnet_cli.service.serve import serve_missing

        if serve_missing() is not None:
            pytest.skip(serve_missing())
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(photo)
    server.faults.append(Fault(stall_after=600_000))
    partial = isolated_home / "weights" / PARTIAL
    args = ["classify", str(photo)] if command == "classify" else ["serve", "--port", "0"]
    process = subprocess.Popen(
        _mixnet(*args, "--mirror", server.url), env=_env(isolated_home), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        _wait_for(lambda: _size(partial) == 600_000, "the first 600000 bytes")
        assert (isolated_home / "weights" / LOCK).exists()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert "Traceback" not in stderr
    assert process.returncode == (130 if command == "classify" else 0), stderr
    assert_nothing_installed(isolated_home, partial=True)


def test_several_processes_needing_the_same_file_share_one_download(server, isolated_home, weights_bytes, tmp_path):
    from PIL import Image

    image = tmp_path / "grey.png"
    Image.new("RGB", (64, 48), (120, 130, 140)).save(image)
    server.faults.append(Fault(stall_after=200_000))
    env = _env(isolated_home)
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = logs / f"{name}.err"
        with open(log, "w") as err:
            process = subprocess.Popen(_mixnet(*args), env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        return process, log

    commands = {
        "first": ("download", "S", "--mirror", server.url),
        "second": ("download", "S", "--mirror", server.url),
        "third": ("download", "S", "--mirror", server.url, "--force"),
        "classify": ("classify", str(image), "--json", "--mirror", server.url),
    }
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        running["first"] = start("first", *commands["first"])
        _wait_for(lambda: _size(isolated_home / "weights" / PARTIAL) == 200_000, "the first process to download")
        for name in ("second", "third", "classify"):
            running[name] = start(name, *commands[name])
        for name in ("second", "third", "classify"):
            _wait_for(lambda: "waiting for another mixnet process downloading" in running[name][1].read_text(),
                      f"{name} to wait for the lock")
        server.gate.set()
        outputs = {name: process.communicate(timeout=120)[0] for name, (process, _) in running.items()}
    finally:
        for process, _ in running.values():
            process.kill()
    for name, (process, log) in running.items():
        assert process.returncode == 0, f"{name}: {log.read_text()}"
        assert "Traceback" not in log.read_text()
    assert len(server.file_requests(PATH)) == 1, "one download served every process"
    # Each says what it did: one downloaded, the others waited for it.
    assert "MixNet_S: downloaded /" in running["first"][1].read_text()
    for name in ("second", "third"):
        assert "MixNet_S: downloaded by another mixnet process" in running[name][1].read_text()
    assert json.loads(outputs["classify"])[0]["input"] == str(image)
    assert_installed(isolated_home, weights_bytes)
