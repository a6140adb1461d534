"""OpenCV as a user's machine has it: one that cannot load is named before any model loads (classify) and fails
its row (doctor); the C libraries inside it keep their warnings off the user's terminal."""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

_LIBGL_MISSING = "libGL.so.1: cannot open shared object file: No such file or directory"


def _mixnet(*arguments: str, cwd: Path, prefix: list[str] | None = None,
            pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    return subprocess.run([*(prefix or []), sys.executable, "-m", "mixnet_cli", *arguments], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _libgl_of_cv2() -> Path | None:
    """The libGL.so.1 the installed cv2 extension links (None: a headless OpenCV, which links none)."""
    import importlib.util

    spec = importlib.util.find_spec("cv2")
    if spec is None or spec.submodule_search_locations is None or shutil.which("ldd") is None:
        return None
    for location in spec.submodule_search_locations:
        for extension in Path(location).rglob("cv2*.so"):
            linked = subprocess.run(["ldd", str(extension)], capture_output=True, text=True).stdout
            found = re.search(r"libGL\.so\.1 => (\S+)", linked)
            if found:
                return Path(found.group(1))
    return None


def _without_libgl() -> list[str]:
    """A prefix that runs a command where the dynamic loader cannot load libGL.so.1: a private mount namespace in
    which that file is /dev/null (a real loader failure, "file too short"). Skips where that cannot be done."""
    libgl = _libgl_of_cv2()
    if libgl is None:
        pytest.skip("the installed OpenCV links no libGL.so.1 (a headless build)")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c",
                            f"mount --bind /dev/null {libgl} && true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot hide libGL.so.1 in a mount namespace here ({probe.stderr.strip()[:100]})")
    return ["unshare", "--mount", "--map-root-user", "sh", "-c", f'mount --bind /dev/null {libgl} && exec "$@"', "sh"]


def _cv2_that_cannot_load(tmp_path: Path) -> str:
    """A directory to put first on PYTHONPATH, whose cv2 fails as opencv-python does on a machine without
    libGL.so.1 (for machines where the loader cannot be made to miss it)."""
    package = tmp_path / "no-libgl" / "cv2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"raise ImportError({_LIBGL_MISSING!r})\n")
    return str(package.parent)


@pytest.mark.parametrize("how", ["loader", "import"])
def test_an_opencv_that_cannot_load_is_named_with_its_fix_before_the_model_loads(how, tmp_path, random_mirror):
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "a.png")
    if how == "loader":
        result = _mixnet("classify", "a.png", cwd=tmp_path, prefix=_without_libgl())
    else:
        result = _mixnet("classify", "a.png", cwd=tmp_path, pythonpath=_cv2_that_cannot_load(tmp_path))
    assert result.returncode == 1, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: OpenCV (cv2) cannot load: the system library libGL.so.1 ")
    assert "apt-get install libgl1" in lines[0] and "pip install opencv-python-headless" in lines[0]
    assert "a.png" not in lines[0], "not blamed on the image"
    assert random_mirror.requests == [], "found before the weights are fetched and the model loads"


def test_doctor_fails_the_opencv_row_when_it_cannot_load(tmp_path):
    import json

    result = _mixnet("doctor", "--json", cwd=tmp_path, pythonpath=_cv2_that_cannot_load(tmp_path),
                     prefix=["env", "MIXNET_OFFLINE=1"])
    assert result.returncode == 1, result.stderr
    rows = {row["check"]: row for row in json.loads(result.stdout)}
    row = rows["OpenCV loads"]
    assert row["status"] == "fail" and "libGL.so.1" in row["value"] and "apt-get install libgl1" in row["hint"]


def test_doctor_says_opencv_loads(tmp_path):
    import json

    result = _mixnet("doctor", "--json", cwd=tmp_path, prefix=["env", "MIXNET_OFFLINE=1"])
    rows = {row["check"]: row for row in json.loads(result.stdout)}
    assert rows["OpenCV loads"]["status"] == "ok", rows["OpenCV loads"]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_with_an_invalid_gamma(path: Path) -> Path:
    """A whole, valid picture whose gAMA chunk says 0, which libpng warns about on stderr as it decodes."""
    width = height = 32
    rows = b"".join(b"\x00" + bytes([120, 60, 200]) * width for _ in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + _png_chunk(b"gAMA", struct.pack(">I", 0)) + _png_chunk(b"IDAT", zlib.compress(rows))
                     + _png_chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_decoders_own_warnings_stay_off_stderr(quiet, tmp_path, random_mirror):
    _png_with_an_invalid_gamma(tmp_path / "gamma.png")
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)  # libpng: an error; OpenCV: a warning
    (tmp_path / "notes.jpg").write_text("not an image\n")
    (tmp_path / "header.bmp").write_bytes(b"BM" + bytes(20))  # OpenCV 4.6: "imdecode_(''): can't read header: ..."
    result = _mixnet("classify", "gamma.png", "cut.png", "notes.jpg", "header.bmp", "--jsonl",
                     *(["-q"] if quiet else []), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert [line.split('"input": ')[1].split(",")[0] for line in result.stdout.splitlines()] == [
        '"gamma.png"', '"cut.png"', '"notes.jpg"', '"header.bmp"']
    assert '"predictions"' in result.stdout.splitlines()[0], "the picture itself is fine"
    if quiet:
        assert result.stderr == ""
    else:
        # mixnet's own lines only: the one-time notice of the conversion, and the errors
        errors = [line for line in result.stderr.splitlines()
                  if not line.startswith(("mixnet: converting ", "mixnet: downloading "))]
        assert [line for line in errors if not line.startswith("Error: ")] == [], result.stderr
        assert len(errors) == 4  # cut.png, notes.jpg, header.bmp, "3 of 4 image(s) failed"
