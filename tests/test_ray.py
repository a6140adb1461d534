"""`mixnet classify-dataset` and the Ray API on a real Ray cluster of this machine: 2 CPUs on 127.0.0.1, started
here and stopped at the end, checked to leave no process behind and to listen on loopback only.

Each run of the command is a separate driver process (as a user runs it) with a time limit; the results are
compared with `mixnet classify --jsonl` on the same files. Deselect with `-m "not ray"`; without the [ray] extra
the module is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner
from PIL import Image

# Read by Ray when it is imported: on this machine every socket stays on loopback (with the node address
# 127.0.0.1 given to ray.init); inherited by the drivers this module starts. No usage reports.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

try:
    import pyarrow.parquet as pq
    import ray
    import ray.data
except ImportError as exc:  # the [ray] extra is not installed (or cannot be: numpy 1.x beside paddleclas)
    pytest.skip(f'needs the [ray] extra (pip install "mixnet-cli[ray]"): {exc}', allow_module_level=True)

from mixnet_cli.cli import main
from mixnet_cli.distributed import MixnetPredictor, plan_actors, result_schema
from mixnet_cli.base.errors import UsageError

pytestmark = pytest.mark.ray

MIXNET = [sys.executable, "-m", "mixnet_cli"]
ACTOR_TITLE = "ray::MixnetPredictor"
RUN_TIMEOUT_S = 300  # per run of the command: generous, this machine is shared and sometimes very busy
GOOD_IMAGES = 60


# --- the cluster and its processes ---------------------------------------------------------------------------------


def _process_tree(root: int) -> dict[int, str]:
    """Every live descendant of ``root`` (zombies excluded), with its command line."""
    children: dict[int, list[int]] = defaultdict(list)
    states: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        states[int(entry.name)] = fields[0]
        children[int(fields[1])].append(int(entry.name))
    found: dict[int, str] = {}
    stack = list(children[root])
    while stack:
        pid = stack.pop()
        stack.extend(children[pid])
        if states.get(pid) == "Z":
            continue
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
    return found


def _listening_addresses(pids: Iterator[int] | list[int]) -> set[str]:
    """The addresses the TCP sockets of ``pids`` listen on (from /proc/net/tcp and tcp6), as hex strings."""
    listening: dict[str, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                listening[fields[9]] = fields[1].split(":")[0]
    found = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and link[8:-1] in listening:
                found.add(listening[link[8:-1]])
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


class LocalCluster:
    """A Ray cluster of this machine, started by this process (its driver) with 2 CPUs on 127.0.0.1."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="mxray")  # short: Ray's socket paths must fit in 107 bytes
        self._address_variable = os.environ.pop("RAY_ADDRESS", None)
        context = ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
                           _temp_dir=self.temp_dir, logging_level="warning")
        self.address = context.address_info["gcs_address"]
        self.seen: dict[int, str] = {}

    def processes(self) -> dict[int, str]:
        """The cluster's processes and our drivers (all descend from this one); remembered for the final check."""
        tree = _process_tree(os.getpid())
        self.seen.update(tree)
        return tree

    def stop(self) -> None:
        self.processes()
        if ray.is_initialized():
            ray.shutdown()
        if self._address_variable is not None:
            os.environ["RAY_ADDRESS"] = self._address_variable

    def left_behind(self, wait_s: float = 60.0) -> dict[int, str]:
        deadline = time.monotonic() + wait_s
        while True:
            alive = {pid: cmd for pid, cmd in _process_tree(os.getpid()).items() if pid in self.seen}
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    started = LocalCluster()
    yield started
    started.stop()
    import shutil

    shutil.rmtree(started.temp_dir, ignore_errors=True)


# --- the images and the reference ----------------------------------------------------------------------------------


def _photo(path: Path, index: int) -> Path:
    size = (96 + 8 * (index % 7), 80 + 6 * (index % 5))
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    colour = ((37 * index) % 256, (91 * index) % 256, (53 * index) % 256)
    image.paste(colour, (size[0] // 4, size[1] // 4, size[0] // 2 + index % 9, size[1] // 2))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def image_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good photos in two folders, with corrupt files among them (text named .jpg, a truncated JPEG, an empty
    PNG), plus files the extension filter skips (notes.txt, a hidden .jpg)."""
    root = tmp_path_factory.mktemp("ray-images")
    for index in range(GOOD_IMAGES):
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(exist_ok=True)
        _photo(folder / f"img{index:03d}.{'png' if index % 3 == 0 else 'jpg'}", index)
    (root / "a" / "notes.jpg").write_text("not an image\n")
    good = (root / "b" / "img000.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "a" / "readme.txt").write_text("skipped by the extension filter\n")
    (root / "b" / ".hidden.jpg").write_bytes(good)
    return root


@pytest.fixture(scope="module")
def seeded_home(tmp_path_factory: pytest.TempPathFactory, calibrated_server) -> Path:
    """A cache holding MixNet_S's calibrated weights, for every driver and actor of this module (--offline)."""
    home = tmp_path_factory.mktemp("ray-home")
    environment = {**_environment(home), "MIXNET_MIRROR": calibrated_server.url}
    subprocess.run(MIXNET + ["download", "S"], env=environment, check=True, capture_output=True, timeout=120)
    return home


@pytest.fixture(scope="module")
def local_results(image_set: Path, seeded_home: Path) -> dict[str, dict[str, Any]]:
    """`mixnet classify DIR --jsonl` on the same files: the reference, by input."""
    run = subprocess.run(MIXNET + ["classify", str(image_set), "--jsonl", "--offline"], env=_environment(seeded_home),
                         capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 1, run.stderr  # the corrupt files
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    return {row["input"]: row for row in rows}


def _environment(home: Path) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MIXNET_", "RAY_ADDRESS"))}
    environment.update(MIXNET_HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return environment


def _command(cluster: LocalCluster, source: Path, out: Path, *extra: str) -> list[str]:
    return MIXNET + ["classify-dataset", str(source), "-o", str(out), "--address", cluster.address, *extra]


def _run(cluster: LocalCluster, home: Path, source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(cluster, source, out, "--offline", *extra), env=_environment(home),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _rows(out: Path) -> list[dict[str, Any]]:
    """Every row of every Parquet part in ``out``, as the CLI's JSON object (null fields and the key dropped,
    the key checked to be the input's absolute path)."""
    rows = []
    for part in sorted(out.glob("*.parquet")):
        table = pq.read_table(part)
        assert table.schema.equals(result_schema()), table.schema
        for row in table.to_pylist():
            assert row.pop("key") == os.path.normpath(os.path.abspath(row["input"])), row
            rows.append({key: value for key, value in row.items() if value is not None})
    return rows


def _parts(out: Path) -> int:
    return len(list(out.glob("part-*.parquet")))


def _assert_each_input_once_and_equal(rows: list[dict[str, Any]], local: dict[str, dict[str, Any]]) -> None:
    counts = Counter(row["input"] for row in rows)
    assert [name for name, count in counts.items() if count > 1] == [], "duplicated inputs"
    assert set(counts) == set(local), "missing or extra inputs"
    for row in rows:
        assert row == local[row["input"]], row["input"]


def _wait_for(condition: Any, process: subprocess.Popen, timeout_s: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the job ended first: {process.stderr.read() if process.stderr else ''}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- without a cluster ---------------------------------------------------------------------------------------------


def test_canonical_keys_are_one_spelling_per_input(tmp_path, monkeypatch):
    from mixnet_cli.distributed import canonical_key

    monkeypatch.chdir(tmp_path)
    assert canonical_key("photos/./a/../b.jpg") == canonical_key(f"{tmp_path}//photos/b.jpg") == \
        f"{tmp_path}/photos/b.jpg"
    assert canonical_key("s3://bucket//photos/./x/../b.jpg") == "s3://bucket/photos/b.jpg"
    assert canonical_key("S3://bucket/Photos/b.jpg") == "s3://bucket/Photos/b.jpg"  # keys keep their case
    assert canonical_key("HTTPS://Example.COM/a//b.jpg?size=2") == "https://example.com/a/b.jpg?size=2"
    assert canonical_key(f"file://{tmp_path}/photos//b.jpg") == f"{tmp_path}/photos/b.jpg"


def test_manifests_are_read_lazily_as_text_parquet_or_csv(tmp_path, monkeypatch):
    import io

    import pyarrow

    from mixnet_cli.distributed import check_manifest, iter_inputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_text("# photos\nphotos/a.jpg\n\n  s3://bucket/b.jpg  \n")
    pq.write_table(pyarrow.table({"uri": ["photos/a.jpg", "s3://bucket/b.jpg"]}), tmp_path / "list.parquet")
    (tmp_path / "list.csv").write_text("id,uri\n1,photos/a.jpg\n2,s3://bucket/b.jpg\n")
    expected = [("photos/a.jpg", f"{tmp_path}/photos/a.jpg"), ("s3://bucket/b.jpg", "s3://bucket/b.jpg")]
    for manifest, column in (("list.txt", None), ("list.parquet", "uri"), ("list.csv", "uri")):
        check_manifest(manifest, column)
        rows = iter_inputs([], files_from=manifest, files_from_column=column)
        assert next(rows)[:2] == expected[0]  # a generator: nothing read beyond what is asked for
        assert [row[:2] for row in rows] == expected[1:]
    stdin = io.BytesIO(b"photos/a.jpg\ns3://bucket/b.jpg\n")
    assert [row[:2] for row in iter_inputs([], files_from="-", stdin=stdin)] == expected
    with pytest.raises(UsageError, match=r"no column 'path' \(it has uri\); name the column of paths with "
                                         r"--files-from-column"):
        check_manifest("list.parquet")
    with pytest.raises(UsageError, match="list.missing: no such file"):
        check_manifest("list.missing")


def test_a_uri_prefix_is_listed_level_by_level_like_a_local_directory(tmp_path):
    from mixnet_cli.distributed import iter_inputs

    for relative in ("b.jpg", "a/c.png", "a/deeper/d.webp", ".hidden/e.jpg", "a/.f.jpg", "notes.txt"):
        (tmp_path / "bucket" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "bucket" / relative).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    prefix = f"file://{tmp_path}/bucket"
    rows = list(iter_inputs([prefix + "/"]))
    assert sorted(row.input for row in rows) == [f"{prefix}/a/c.png", f"{prefix}/a/deeper/d.webp", f"{prefix}/b.jpg"]
    assert all(row.error is None and row.path == row.input.encode() for row in rows)
    assert [row.input for row in iter_inputs([prefix], recursive=False)] == [f"{prefix}/b.jpg"]
    (failed,) = iter_inputs([f"file://{tmp_path}/empty"])
    assert failed.path is None and "has no image files" in str(failed.error)
    (missing,) = iter_inputs([f"file://{tmp_path}/nowhere"])
    assert "no such file or directory" in str(missing.error)


def test_the_done_set_holds_eight_bytes_per_key():
    from mixnet_cli.distributed import DoneSet, key_hash

    keys = [f"/data/photos/{index:07d}.jpg" for index in range(10_000)]
    done = DoneSet(key_hash(key) for key in keys[::2])
    assert done.contains(keys[:6]) == [True, False, True, False, True, False]
    assert len(done) == 5_000 and done.nbytes == 8 * 5_000
    assert DoneSet().contains(["/a.jpg"]) == [False]


def test_gpu_planning_arithmetic():
    # GPUs asked for: one actor per GPU by default, per share with fractions, CPUs shared between them.
    assert plan_actors([8.0, 8.0], cluster_gpus=8, device="gpu") == plan_actors([8.0, 8.0], cluster_gpus=8, device="gpu:1")
    plan = plan_actors([8.0, 8.0], cluster_gpus=8, device="gpu")
    assert (plan.actors, plan.gpus, plan.cpus, plan.device) == (8, 1.0, 1.75, "gpu")
    plan = plan_actors([8.0, 8.0], cluster_gpus=8, device="gpu", gpus_per_actor=0.5)
    assert (plan.actors, plan.gpus, plan.cpus) == (16, 0.5, 0.75)
    assert plan_actors([8.0], cluster_gpus=2, device="gpu", actors=1).actors == 1
    # auto: GPUs are used only when the cluster has them, and then each actor is given its share by Ray.
    assert plan_actors([8.0], cluster_gpus=2, device="auto").gpus == 1.0
    plan = plan_actors([8.0, 8.0], cluster_gpus=0, device="auto")
    assert (plan.actors, plan.gpus, plan.device) == (2, 0.0, "cpu")
    with pytest.raises(UsageError, match="the Ray cluster has no GPU"):
        plan_actors([8.0], cluster_gpus=0, device="gpu")
    with pytest.raises(UsageError, match="more than the cluster's 1 GPU"):
        plan_actors([8.0], cluster_gpus=1, device="gpu", gpus_per_actor=2)
    with pytest.raises(UsageError, match="--gpus-per-actor needs GPUs"):
        plan_actors([8.0], device="cpu", gpus_per_actor=0.5)


def test_an_actor_opens_the_gpu_ray_assigned_it():
    from mixnet_cli.distributed import actor_device

    # Ray narrows CUDA_VISIBLE_DEVICES to the assigned GPU: inside the actor it is number 0, whatever N was asked.
    assert actor_device("gpu:1", ["3"], "3") == "gpu:0"
    assert actor_device("gpu", ["2", "5"], "2,5") == "gpu:0"
    assert actor_device("gpu", ["5"], None) == "gpu:5"  # Ray told not to set CUDA_VISIBLE_DEVICES
    assert actor_device("auto", [], "") == "cpu"  # no GPU accounted for: never one of someone else's
    assert actor_device("cpu", ["0"], "0") == "cpu"
    assert actor_device("auto", None, None) == "auto"  # outside Ray: as asked


def test_progress_gives_the_time_left_once_every_input_is_listed():
    from mixnet_cli.distributed import JobSummary, job_progress

    summary = JobSummary(images=300, failed=2, skipped=40)
    still_listing = job_progress(summary, 10.0, 1_000, listed_all=False)
    assert (still_listing.done, still_listing.failed, still_listing.rows_per_s, still_listing.eta_s) == (300, 2, 30.0, None)
    assert job_progress(summary, 10.0, 1_000, listed_all=True).eta_s == pytest.approx(700 / 30)
    assert job_progress(JobSummary(), 0.0, 64, listed_all=True).eta_s is None  # no result yet: no rate


def test_fail_fast_needs_the_same_error_for_every_first_input():
    from mixnet_cli.distributed.job import _FailFast

    def missing(name: str) -> tuple[str, dict[str, str]]:
        return name, {"type": "ImageNotFoundError", "message": f"{name}: no such file; check the path"}

    stop = _FailFast(3)
    assert stop.add([missing("s3://b/one.jpg"), missing("s3://b/two.jpg")]) is None
    assert stop.add([missing("s3://b/three.jpg")]) == "s3://b/one.jpg: no such file; check the path"
    mixed = _FailFast(3)
    assert mixed.add([missing("a.jpg"), ("b.jpg", None), missing("c.jpg"), missing("d.jpg")]) is None
    assert not mixed.active and _FailFast(0).add([missing("a.jpg")]) is None


def test_one_job_per_output_folder_local_and_on_object_storage(tmp_path):
    from mixnet_cli.distributed import ResultsDirectory

    first = ResultsDirectory(str(tmp_path / "out"))
    first.open(resume=False)
    with pytest.raises(UsageError, match=rf"another classify-dataset job is writing there \(run {first.run}, pid "
                                         rf"{os.getpid()} on "):
        ResultsDirectory(str(tmp_path / "out")).open(resume=True)
    first.close()
    ResultsDirectory(str(tmp_path / "out")).open(resume=True)  # released: the next job may write

    # A URI (pyarrow's filesystem, as for s3://): a record with a heartbeat; a stale one is taken over.
    uri = f"file://{tmp_path}/remote"
    holder = ResultsDirectory(uri, heartbeat_s=0.2, stale_after_s=2.0)
    holder.open(resume=False)
    time.sleep(0.5)  # a few heartbeats
    with pytest.raises(UsageError, match=rf"\(run {holder.run}, "):
        ResultsDirectory(uri, heartbeat_s=0.2, stale_after_s=2.0).open(resume=True)
    holder.lock._stop.set()  # the holder dies without releasing: its heartbeat stops
    holder.lock._thread.join()
    time.sleep(2.5)
    taker = ResultsDirectory(uri, heartbeat_s=0.2, stale_after_s=2.0)
    taker.open(resume=True)
    time.sleep(0.5)
    assert json.loads((tmp_path / "remote" / ".mixnet-job.json").read_text())["run"] == taker.run
    taker.close()
    assert not (tmp_path / "remote" / ".mixnet-job.json").exists()


def test_predictor_gives_error_rows_and_never_raises(tmp_path, image_set, calibrated_mirror):
    predictor = MixnetPredictor("S", threads=1)
    good = image_set / "b" / "img000.png"
    batch = {"path": [str(good), str(tmp_path / "missing.jpg"), str(image_set / "a" / "notes.jpg"),
                      "file://" + str(good)]}
    table = predictor(batch)
    assert table.schema.equals(result_schema())
    rows = table.to_pylist()
    assert [row["input"] for row in rows] == batch["path"]
    assert [row["error"]["type"] if row["error"] else None for row in rows] == [
        None, "ImageNotFoundError", "NotAnImageError", None]
    assert rows[0]["predictions"] == rows[3]["predictions"] and len(rows[0]["predictions"]) == 5
    # Encoded bytes (as read_binary_files gives them): the path only names the image.
    from_bytes = predictor({"path": ["x.png"], "bytes": [good.read_bytes()]}).to_pylist()[0]
    assert from_bytes["input"] == "x.png" and from_bytes["predictions"] == rows[0]["predictions"]


def test_uris_are_listed_with_the_same_filter_as_local_directories(image_set, tmp_path):
    from mixnet_cli.distributed import list_inputs

    local = list_inputs([str(image_set)], "MixNet_S")
    remote = list_inputs([f"file://{image_set}", f"file://{tmp_path}/missing/"], "MixNet_S")
    assert [row["input"] for row in remote.rows] == [f"file://{row['input']}" for row in local.rows]
    assert len(local.rows) == GOOD_IMAGES + 3 and not any(".hidden" in row["input"] for row in local.rows)
    assert [failure.error.__class__.__name__ for failure in remote.failures] == ["ImageNotFoundError"]


def test_actor_plan_leaves_room_for_ray_tasks():
    assert plan_actors([2.0]) == plan_actors([2.0], actors=1)
    one = plan_actors([2.0])
    assert (one.actors, one.cpus, one.threads) == (1, 1.5, 2)
    two = plan_actors([2.0], actors=2)
    assert two.actors * two.cpus <= 1.5 and two.threads == 1
    assert plan_actors([8.0, 8.0, 4.0]).actors == 3
    assert plan_actors([2.0], cpus_per_actor=0.5).cpus == 0.5


def test_non_empty_output_is_refused_before_ray_starts(tmp_path, image_set):
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-earlier.parquet").write_bytes(b"PAR1")
    result = CliRunner().invoke(main, ["classify-dataset", str(image_set), "-o", str(out), "--address",
                                       "127.0.0.1:1"], catch_exceptions=False)
    assert result.exit_code == 2
    assert "not empty" in result.stderr and "--resume" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in out.iterdir()] == ["part-earlier.parquet"], "never appended to"


@pytest.mark.parametrize("missing", [("ray", "ray.data"), ("pyarrow", "pyarrow.fs", "pyarrow.parquet")])
def test_without_the_extra_the_command_says_what_to_install(tmp_path, image_set, monkeypatch, missing):
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # import then raises ImportError, as when not installed
    result = CliRunner().invoke(main, ["classify-dataset", str(image_set), "-o", str(tmp_path / "out")],
                                catch_exceptions=False)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    from mixnet_cli.base.third_party import install_hint

    assert len(lines) == 1 and lines[0].startswith(f"Error: the Ray route needs the [ray] extra: {install_hint('ray')}"), \
        result.stderr


def test_weights_that_cannot_be_had_stop_a_local_job_before_ray_starts(tmp_path, image_set):
    result = CliRunner().invoke(main, ["classify-dataset", str(image_set), "-o", str(tmp_path / "out"), "--offline"],
                                catch_exceptions=False)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "offline" in result.stderr and "mixnet download S" in result.stderr
    assert not ray.is_initialized() and list((tmp_path / "out").iterdir()) == []


def test_local_commands_never_import_ray(image_set, calibrated_mirror):
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom mixnet_cli.cli import main\n"
        "CliRunner().invoke(main, ['--help'])\nCliRunner().invoke(main, ['classify-dataset', '--help'])\n"
        f"assert CliRunner().invoke(main, ['classify', {str(image_set / 'b' / 'img000.png')!r}]).exit_code == 0\n"
        "print(','.join(m for m in ('ray', 'pyarrow') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


# --- on the cluster ------------------------------------------------------------------------------------------------


def test_results_equal_the_local_run_in_one_dataset_that_one_job_owns(cluster, image_set, seeded_home,
                                                                     local_results, tmp_path, calibrated_weights_dir):
    """The rows equal `mixnet classify`'s; the folder is one Parquet dataset (JSON lines in _jsonl/) that pandas
    and pyarrow read as a folder, each part carrying its provenance; a second job into it is refused in one line
    naming the running one."""
    import hashlib

    import pandas

    out = tmp_path / "out"
    first = subprocess.Popen(_command(cluster, image_set, out, "--offline", "--jsonl", "--rows-per-file", "25",
                                      "--images-per-task", "16", "--progress-every", "0.5"),
                             env=_environment(seeded_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / ".mixnet-job.json").is_file(), first)
        holder = json.loads((out / ".mixnet-job.json").read_text())
        second = _run(cluster, seeded_home, image_set, out, "--resume")
        _, stderr = first.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"Error: -o {out}: another classify-dataset job is writing there (run {holder['run']}, pid {first.pid} on "
        f"{holder['host']}, started {holder['started_at']}); wait for it to finish, or choose another directory"), lines

    assert first.returncode == 1, stderr  # three corrupt files
    summary = stderr.strip().splitlines()
    assert f"{GOOD_IMAGES + 3} image(s) classified" in summary[-2] and "3 failed" in summary[-2]
    assert "images/s over the whole job, of which" in summary[-2] and "s start-up" in summary[-2]
    assert summary[-1].startswith("Error: 3 image(s) failed")
    progress = [line for line in summary if line.startswith("progress: ")]
    assert progress and all(re.fullmatch(r"progress: \d+ row\(s\) done, [\d.]+ rows/s, \d+ failed(, about "
                                          r"\d+m\d\ds left)?", line) for line in progress), progress
    rows = _rows(out)
    _assert_each_input_once_and_equal(rows, local_results)
    assert {row["error"]["type"] for row in rows if "error" in row} == {"NotAnImageError", "TruncatedImageError"}
    jsonl = [json.loads(line) for part in sorted((out / "_jsonl").glob("part-*.jsonl"))
             for line in part.read_text().splitlines()]
    assert all(row.pop("key") for row in jsonl)
    assert sorted(jsonl, key=lambda r: r["input"]) == sorted(rows, key=lambda r: r["input"])
    assert _parts(out) >= 2 and not list(out.glob(".*")), "only finished parts are left, and no lock"

    # One dataset, read as a folder.
    assert len(pandas.read_parquet(out)) == len(rows) == pq.read_table(out).num_rows
    weights_sha256 = hashlib.sha256((calibrated_weights_dir / "MixNet_S_pretrained.pdparams").read_bytes()).hexdigest()
    for part in out.glob("part-*.parquet"):
        metadata = {key.decode(): value.decode() for key, value in pq.read_schema(part).metadata.items()
                    if key.startswith(b"mixnet.")}
        assert set(metadata) == {f"mixnet.{name}" for name in ("version", "model", "weights_sha256", "engine",
                                                                 "precision", "device", "topk", "run_id",
                                                                 "started_at")}, metadata
        assert metadata["mixnet.model"] == "MixNet_S" and metadata["mixnet.topk"] == "5"
        assert metadata["mixnet.run_id"] == holder["run"] and metadata["mixnet.started_at"][:4].isdigit()
        assert metadata["mixnet.device"] == "cpu" and metadata["mixnet.precision"] == "fp32"
        assert metadata["mixnet.weights_sha256"] == weights_sha256


def test_a_path_that_is_missing_is_an_error_row_beside_the_others(cluster, image_set, seeded_home, local_results,
                                                                  tmp_path):
    """A named file or folder that does not exist fails while the inputs are listed, before any actor: its row
    has the columns of any failed image's row, and the other inputs are classified."""
    out = tmp_path / "out"
    good = image_set / "b" / "img000.png"
    missing_file, missing_folder = tmp_path / "missing.jpg", tmp_path / "nowhere"
    result = subprocess.run(MIXNET + ["classify-dataset", str(good), str(missing_file), str(missing_folder), "-o",
                                      str(out), "--address", cluster.address, "--offline"],
                            env=_environment(seeded_home), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 1, result.stderr
    assert "a bug" not in result.stderr, result.stderr
    rows = {row["input"]: row for row in _rows(out)}
    assert rows.pop(str(good)) == local_results[str(good)]
    assert set(rows) == {str(missing_file), str(missing_folder)}
    for row in rows.values():
        assert row["model"] == row["architecture"] == "MixNet_S" and row["error"]["type"] == "ImageNotFoundError", row


def test_a_killed_actor_loses_and_duplicates_nothing(cluster, image_set, local_results, tmp_path,
                                                    calibrated_weights_dir, file_server):
    """Two actors on a fresh cache: they download the weights once between them (the cache's file lock), one is
    killed mid-job, and every input still comes out exactly once."""
    out = tmp_path / "out"
    mirror = file_server(calibrated_weights_dir)
    environment = {**_environment(tmp_path / "fresh-home"), "MIXNET_MIRROR": mirror.url}
    process = subprocess.Popen(_command(cluster, image_set, out, "--actors", "2", "--rows-per-file", "4",
                                        "--images-per-task", "4"),
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: out.is_dir() and _parts(out) >= 1, process)
        actors = [pid for pid, command in cluster.processes().items() if command.startswith(ACTOR_TITLE)]
        assert actors, "no actor process found"
        # While the job runs, nothing of it listens beyond loopback (drivers, cluster and actors alike).
        addresses = {pid: _listening_addresses([pid]) for pid in [os.getpid(), *cluster.processes()]}
        assert {a for found in addresses.values() for a in found} <= LOOPBACK, {
            f"{pid} {cluster.seen.get(pid, 'pytest')[:50]}": found - LOOPBACK for pid, found in addresses.items() if found - LOOPBACK}
        os.kill(actors[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr
    assert _parts(out) > 1
    _assert_each_input_once_and_equal(_rows(out), local_results)
    assert mirror.requests == ["/MixNet_S_pretrained.pdparams"], "one download for all the actors of the node"


def test_a_killed_job_resumes_with_every_input_once(cluster, image_set, seeded_home, local_results, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(_command(cluster, image_set, out, "--offline", "--rows-per-file", "4",
                                        "--images-per-task", "4"),
                               env=_environment(seeded_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        _wait_for(lambda: out.is_dir() and _parts(out) >= 2, process)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    done_before = len(_rows(out))
    assert 0 < done_before < len(local_results), "killed before the end"

    refused = _run(cluster, seeded_home, image_set, out)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = _run(cluster, seeded_home, image_set, out, "--resume")
    assert resumed.returncode == 1, resumed.stderr  # the corrupt files, whichever run classified them
    assert f"{len(local_results) - done_before} image(s) classified" in resumed.stderr
    assert f"{done_before} already in" in resumed.stderr
    _assert_each_input_once_and_equal(_rows(out), local_results)

    again = _run(cluster, seeded_home, image_set, out, "--resume")  # nothing left: no new part, same answer
    assert again.returncode == 1 and "0 image(s) classified" in again.stderr
    _assert_each_input_once_and_equal(_rows(out), local_results)


def test_resume_under_another_spelling_adds_nothing_and_retry_failed_replaces_error_rows(
        cluster, image_set, seeded_home, local_results, tmp_path):
    """Run from the folder above with relative names, resume from / with absolute, redundant ones: nothing is
    classified twice. A file fixed after its error row is not seen by --resume (README says so); --retry-failed
    classifies it again and replaces its row."""
    photos = tmp_path / "photos"
    shutil.copytree(image_set / "b", photos)
    (photos / "truncated.png").write_bytes((image_set / "b" / "truncated.png").read_bytes())
    count = len(list(photos.glob("*.png"))) + len(list(photos.glob("img*.jpg")))

    def run(cwd: Path, source: str, out: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(MIXNET + ["classify-dataset", source, "-o", out, "--address", cluster.address,
                                        "--offline", "--rows-per-file", "8", *extra],
                              env={**_environment(seeded_home), "PYTHONPATH": str(Path(__file__).parents[1])},
                              cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)

    first = run(tmp_path, "photos", "out", "--jsonl")
    assert first.returncode == 1 and f"{count} image(s) classified" in first.stderr, first.stderr
    out = tmp_path / "out"
    table = pq.read_table(out)
    assert sorted(table.column("input").to_pylist()) == sorted(f"photos/{p.name}" for p in photos.iterdir()
                                                               if not p.name.startswith("."))
    assert sorted(table.column("key").to_pylist()) == sorted(str(photos / p) for p in table.column("input").to_pylist()
                                                             for p in [Path(p).name])

    again = run(Path("/"), f"{tmp_path}/./photos/", f"{tmp_path}//out/", "--resume")
    assert again.returncode == 1 and "0 image(s) classified" in again.stderr and f"{count} already in" in again.stderr
    assert pq.read_table(out).num_rows == count

    _photo(photos / "truncated.png", 5)  # fixed: --resume does not look at files already done
    unchanged = run(tmp_path, "photos", "out", "--resume")
    assert unchanged.returncode == 1 and "0 image(s) classified" in unchanged.stderr

    retried = run(tmp_path, "photos", "out", "--resume", "--retry-failed")
    assert retried.returncode == 0, retried.stderr
    assert "1 image(s) classified" in retried.stderr and "0 failed" in retried.stderr
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == count == len({row["key"] for row in rows}), "one row per input"
    assert all(row["error"] is None and row["predictions"] for row in rows)
    jsonl = [json.loads(line) for part in (out / "_jsonl").glob("part-*.jsonl") for line in part.read_text().splitlines()]
    assert sorted(jsonl, key=lambda row: row["key"]) == sorted(
        ({k: v for k, v in row.items() if v is not None} for row in rows), key=lambda row: row["key"])


def test_a_streamed_manifest_gives_the_same_rows_and_a_job_failing_the_same_way_stops_early(
        cluster, image_set, seeded_home, local_results, tmp_path, calibrated_weights_dir):
    """A Parquet manifest, with your own weights and labels (--weights, --labels: here the same weights file under
    its own name, and labels of our own): the rows of `mixnet classify`, with those labels."""
    import pyarrow

    files = sorted(name for name, row in local_results.items() if Path(name).is_file())
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pyarrow.table({"uri": files}), manifest)
    weights = tmp_path / "my-weights.pdparams"
    shutil.copyfile(calibrated_weights_dir / "MixNet_S_pretrained.pdparams", weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"thing {index}\n" for index in range(1000)))
    out = tmp_path / "out"
    run = subprocess.run(MIXNET + ["classify-dataset", "--files-from", str(manifest), "--files-from-column", "uri",
                                   "-o", str(out), "--address", cluster.address, "--offline", "-q",
                                   "--weights", str(weights), "--labels", str(labels)],
                         env=_environment(seeded_home), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 1, run.stderr  # the corrupt files
    import hashlib

    # Your own weights are named by their file: stem and the start of its sha256 (the architecture stays MixNet_S).
    model = f"my-weights-{hashlib.sha256(weights.read_bytes()).hexdigest()[:7]}"
    expected = {}
    for name in files:
        row = {**local_results[name], "model": model}
        if "predictions" in row:
            row["predictions"] = [{**p, "label": f"thing {p['class_id']}"} for p in row["predictions"]]
        expected[name] = row
    _assert_each_input_once_and_equal(_rows(out), expected)

    # Every input fails the same way (here: not there): the job stops after --fail-fast of them, in one line,
    # keeping the parts written.
    missing = "".join(f"{tmp_path}/gone/{index:03d}.jpg\n" for index in range(200))
    stopped_out = tmp_path / "stopped"
    stopped = subprocess.run(MIXNET + ["classify-dataset", "--files-from", "-", "-o", str(stopped_out), "--address",
                                       cluster.address, "--offline", "-q", "--fail-fast", "6", "--images-per-task",
                                       "2", "--rows-per-file", "2"],
                             input=missing, env=_environment(seeded_home), capture_output=True, text=True,
                             timeout=RUN_TIMEOUT_S)
    assert stopped.returncode == 1, stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: the first 6 inputs all failed the same way, so the job stopped: ") and \
        "no such file" in last, stopped.stderr
    written = pq.read_table(stopped_out).num_rows
    assert 6 <= written < 200


def test_device_gpu_on_a_cluster_without_one_is_one_line_before_any_actor(cluster, image_set, seeded_home, tmp_path):
    started = time.monotonic()
    run = _run(cluster, seeded_home, image_set, tmp_path / "out", "--device", "gpu")
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [line for line in run.stderr.splitlines() if "Error" in line]
    assert len(errors) == 1 and "the Ray cluster has no GPU" in errors[0], run.stderr
    assert time.monotonic() - started < 60
    assert not any(command.startswith(ACTOR_TITLE) for command in cluster.processes().values())


def test_api_on_a_dataset_read_by_ray(cluster, image_set, seeded_home, local_results, monkeypatch):
    from mixnet_cli.distributed import classify_dataset

    monkeypatch.setenv("MIXNET_HOME", str(seeded_home))  # forwarded to the actors
    # Read tasks ask for a fraction of a CPU: with whole CPUs they would wait behind the actor forever.
    files = ray.data.read_binary_files(str(image_set / "b"), include_paths=True, num_cpus=0.25,
                                       file_extensions=["png", "jpg"])
    rows = classify_dataset(files, "S", offline=True).take_all()
    assert len(rows) == len([name for name in local_results if "/b/" in name])
    for row in rows:
        expected = local_results[str(image_set / "b" / Path(row["input"]).name)]
        assert row["predictions"] == expected.get("predictions") and row["model"] == "MixNet_S"


def test_without_an_address_the_command_runs_its_own_loopback_cluster_and_stops_it(image_set, seeded_home,
                                                                                   local_results, tmp_path):
    out = tmp_path / "out"
    environment = {k: v for k, v in _environment(seeded_home).items()
                   if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    home = tmp_path / "user-home"  # Ray would put its auth token in ~/.ray: nothing may appear here
    home.mkdir()
    environment["HOME"] = str(home)
    # Ray keeps each session's files under the temporary folder (TMPDIR/ray): the cluster's must go with it.
    # A short path: Ray's Unix sockets live inside it, and socket paths are limited to 107 characters.
    temporary = Path(tempfile.mkdtemp(prefix="mxr", dir="/tmp"))
    environment["TMPDIR"] = str(temporary)
    # Its output goes to a file: a pipe nobody reads while the loop below watches would fill and stop the command.
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        process = subprocess.Popen(MIXNET + ["classify-dataset", str(image_set / "b"), "-o", str(out), "--offline"],
                                   env=environment, stdout=subprocess.DEVNULL, stderr=err, text=True)
    seen: dict[int, str] = {}
    addresses: set[str] = set()
    ends = time.monotonic() + RUN_TIMEOUT_S
    try:
        while process.poll() is None:  # the command's processes: its cluster, its actors
            assert time.monotonic() < ends, f"still running after {RUN_TIMEOUT_S} s: {stderr.read_text()[-2000:]}"
            tree = _process_tree(process.pid)
            seen.update(tree)
            addresses |= _listening_addresses([process.pid, *tree])
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, stderr.read_text()  # the truncated PNG
    assert any(command.startswith(ACTOR_TITLE) for command in seen.values()), seen
    assert addresses and addresses <= LOOPBACK, addresses
    expected = {name: row for name, row in local_results.items() if "/b/" in name}
    _assert_each_input_once_and_equal(_rows(out), expected)
    deadline = time.monotonic() + 60
    while (alive := {pid: command for pid, command in _process_tree(1).items() if seen.get(pid) == command}) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive == {}, "left behind by the command"
    assert list(home.iterdir()) == [], "written outside the cache"
    left = [path.name for path in temporary.iterdir()]
    shutil.rmtree(temporary, ignore_errors=True)
    assert left == [], f"left in the temporary folder: {left}"


def test_the_cluster_leaves_no_process_behind(cluster):
    processes = cluster.processes()
    assert any("raylet" in command for command in processes.values()), processes
    cluster.stop()
    assert cluster.left_behind() == {}


def test_an_address_where_nothing_listens_is_one_line_at_once():
    import socket
    import time as clock

    from mixnet_cli.distributed.cluster import _check_reachable

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = clock.monotonic()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(UsageError, match="nothing answers there"):
            _check_reachable(address)
    assert clock.monotonic() - started < 5
    _check_reachable("auto")  # left to Ray
