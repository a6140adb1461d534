"""`mixnet serve` under the clients that took it down before: header-dripping sockets, a flood, huge PNGs, a JPEG
of fill bytes, a 10,000-part form. Each case against the service of one or more source trees (``--root``, e.g.
the code before a change and after), in one run, on the same machine:

    python benchmarks/serve_attacks.py --home /tmp/mixnet-attacks --root /path/before --root /path/after
    python benchmarks/serve_attacks.py --home /tmp/mixnet-attacks --root ... --root ... --throughput

Each root's service runs from that tree (PYTHONPATH) with the default options (MixNet_S, random calibrated
weights: the answers do not matter here). The attacking clients are threads and sockets of this process.
With --throughput, instead: every root's service at once, 100 photos at 1, 4, 16 and 64 clients, sent to each
in turn, 3 rounds. Prints JSON; writes it to --out when given.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from _common import clean_env, log, machine, prepare_home, sample_images
from serve import Service


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def huge_png(width: int, height: int) -> bytes:
    """A valid RGB PNG of ``width`` x ``height`` black pixels: a few KB that decode to width*height*3 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + width * 3)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def probe(url: str, photo: bytes, stop: threading.Event, every: float = 0.25) -> list[tuple[str, int, float]]:
    """/healthz and a photo, one after the other, until ``stop``: (what, status, seconds) each."""
    import requests

    answers = []
    while not stop.is_set():
        for what, call in (("healthz", lambda: requests.get(url + "/healthz", timeout=30)),
                           ("photo", lambda: requests.post(url + "/v1/classify", data=photo, timeout=30))):
            started = time.perf_counter()
            try:
                status = call().status_code
            except requests.RequestException:
                status = 0
            answers.append((what, status, time.perf_counter() - started))
        stop.wait(every)
    return answers


def while_probing(url: str, photo: bytes, attack: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        probing = pool.submit(probe, url, photo, stop)
        outcome = attack()
        stop.set()
        answers = probing.result()
    ok = [a for a in answers if a[1] == 200]
    return outcome, {"probes": len(answers), "probes_200": len(ok),
                     "probe_max_s": round(max((a[2] for a in answers), default=0.0), 3)}


def slowloris(port: int, sockets: int = 300, seconds: float = 25.0) -> dict[str, Any]:
    """``sockets`` connections dripping a header byte every 0.5 s, each replaced when the server closes it."""
    selector = selectors.DefaultSelector()
    closed = 0

    def open_one() -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        sock.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        selector.register(sock, selectors.EVENT_READ)

    for _ in range(sockets):
        open_one()
    ends, drip = time.monotonic() + seconds, time.monotonic()
    while time.monotonic() < ends:
        for key, _ in selector.select(timeout=0.05):
            try:
                data = key.fileobj.recv(4096)  # type: ignore[union-attr]
            except OSError:
                data = b""
            if not data:
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                closed += 1
                open_one()
        if time.monotonic() >= drip:
            drip += 0.5
            for key in list(selector.get_map().values()):
                try:
                    key.fileobj.send(b"X")  # type: ignore[union-attr]
                except OSError:
                    pass
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return {"closed_by_server": closed}


def flood(url: str, photo: bytes, clients: int = 400) -> dict[str, Any]:
    import requests

    def one(_: int) -> tuple[int, bool, float]:
        started = time.perf_counter()
        try:
            response = requests.post(url + "/v1/classify", data=photo, timeout=60)
        except requests.RequestException:
            return 0, False, time.perf_counter() - started
        documented = response.headers.get("content-type") == "application/json" and "Retry-After" in response.headers
        return response.status_code, documented, time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(pool.map(one, range(clients)))
    refused = [a for a in answers if a[0] == 503]
    metrics = requests.get(url + "/metrics", timeout=30).text
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("mixnet_http_requests_total{") and 'status="503"' in line
                  and 'endpoint="/v1/classify"' in line)
    return {"answered_200": sum(1 for a in answers if a[0] == 200), "refused_503": len(refused),
            "refused_json_retry_after": sum(1 for a in refused if a[1]), "refusals_counted_in_metrics": counted,
            "refusal_max_s": round(max((a[2] for a in refused), default=0.0), 3),
            "other": sum(1 for a in answers if a[0] not in (200, 503))}


def run_root(root: Path, home: Path, photo: bytes, pycache: Path) -> dict[str, Any]:
    import requests

    env = clean_env(home, pycache)
    env["PYTHONPATH"] = str(root)
    service = Service(env, "MixNet_S")
    url, pid = service.url, service.process.pid
    port = int(url.rsplit(":", 1)[1])
    results: dict[str, Any] = {"root": str(root)}
    try:
        idle = rss_mb(pid)
        log(f"{root}: slowloris")
        outcome, probed = while_probing(url, photo, lambda: slowloris(port))
        results["slowloris_300_25s"] = {**outcome, **probed}
        log(f"{root}: flood")
        results["flood_400"] = flood(url, photo)
        log(f"{root}: 8 huge PNGs")
        png = huge_png(13000, 13000)
        idle = rss_mb(pid)

        def huge() -> dict[str, Any]:
            peak = [idle]
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], rss_mb(pid))
                    time.sleep(0.02)

            watcher = threading.Thread(target=watch)
            watcher.start()
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=8) as pool:
                statuses = list(pool.map(lambda _: requests.post(url + "/v1/classify", data=png,
                                                                 timeout=120).status_code, range(8)))
            done.set()
            watcher.join()
            return {"png_bytes": len(png), "statuses": sorted(set(statuses)),
                    "seconds": round(time.perf_counter() - started, 2),
                    "peak_rss_over_idle_mb": round(peak[0] - idle)}

        outcome, probed = while_probing(url, photo, huge)
        results["eight_169mp_pngs"] = {**outcome, **probed}
        log(f"{root}: a JPEG of fill bytes")
        started = time.perf_counter()
        status = requests.post(url + "/v1/classify", data=b"\xff\xd8" + b"\xff" * (31 * 1024 * 1024),
                               timeout=120).status_code
        results["jpeg_31mb_fill"] = {"status": status, "seconds": round(time.perf_counter() - started, 2)}
        log(f"{root}: 10,000 parts")
        files = [("image", (f"{i}.jpg", b"x")) for i in range(10_000)]

        def parts() -> dict[str, Any]:
            started = time.perf_counter()
            status = requests.post(url + "/v1/classify", files=files, timeout=120).status_code
            return {"status": status, "seconds": round(time.perf_counter() - started, 2)}

        outcome, probed = while_probing(url, photo, parts)
        results["multipart_10000_parts"] = {**outcome, **probed}
    finally:
        service.stop()
    return results


def throughput(roots: list[Path], home: Path, photos: list[bytes], pycache: Path, rounds: int = 3,
               levels: tuple[int, ...] = (1, 4, 16, 64)) -> dict[str, Any]:
    """Every root's service running at once, the same photos sent to each in turn (the order swapped every
    round), so that the machine's load, which drifts, weighs on all alike: images/s per round, and the median."""
    import statistics

    import requests

    services = {}
    for root in roots:
        env = clean_env(home, pycache)
        env["PYTHONPATH"] = str(root)
        services[str(root)] = Service(env, "MixNet_S")
    rates: dict[str, dict[int, list[float]]] = {root: {level: [] for level in levels} for root in services}
    try:
        for index in range(rounds):
            for level in levels:
                for root in (list(services) if index % 2 == 0 else list(reversed(services))):
                    url = services[root].url
                    local = threading.local()

                    def post(body: bytes) -> int:
                        session = getattr(local, "session", None) or requests.Session()
                        local.session = session
                        return session.post(url + "/v1/classify", data=body, timeout=120).status_code

                    started = time.perf_counter()
                    with ThreadPoolExecutor(max_workers=level) as pool:
                        statuses = list(pool.map(post, photos))
                    rates[root][level].append(len(photos) / (time.perf_counter() - started))
                    if set(statuses) != {200}:
                        log(f"{root}, {level} clients: statuses {sorted(set(statuses))}")
    finally:
        for service in services.values():
            service.stop()
    return {root: {str(level): {"median": round(statistics.median(values), 1),
                                "rounds": [round(v, 1) for v in values]} for level, values in by_level.items()}
            for root, by_level in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--root", type=Path, action="append", required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--throughput", action="store_true",
                        help="instead of the attacks: images/s of every root's service side by side, interleaved")
    parser.add_argument("--clients", type=int, action="append", help="with --throughput (default 1, 4, 16, 64)")
    parser.add_argument("--rounds", type=int, default=3, help="with --throughput (default 3)")
    options = parser.parse_args()
    prepare_home(options.home, ("MixNet_S",))
    if options.throughput:
        photos = [path.read_bytes() for path in sample_images(100)]
        results = {"machine": machine(), "throughput": throughput(
            options.root, options.home, photos, options.home / "pycache", rounds=options.rounds,
            levels=tuple(options.clients or (1, 4, 16, 64)))}
    else:
        photo = sample_images(1)[0].read_bytes()
        results = {"machine": machine(), "runs": [run_root(root, options.home, photo, options.home / "pycache")
                                                 for root in options.root]}
    if options.out:
        options.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
