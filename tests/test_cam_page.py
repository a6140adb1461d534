"""Class activation maps from `mixnet serve` (``?cam=1``, ``cam_class``) and its page at ``GET /``, in a real
headless Chromium (the system's, driven by Playwright): a generated photo uploaded, the top-5 shown read back and
compared with the JSON answer, another class's map picked, a screenshot taken; a label from the user's label file
that looks like HTML is shown as text."""

from __future__ import annotations

import importlib.util
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from imagegen import scene
from test_serve import ServerProcess, needs_serve
from mixnet_cli import Classifier
from mixnet_cli.base.manifest import resolve_model
from mixnet_cli.images.heatmap import INFERNO
from mixnet_cli.images.labels import imagenet_labels
from mixnet_cli.images.preprocess import crop_region

pytestmark = needs_serve
HOSTILE_LABEL = "<img src=x onerror=window.__injected=1>"
# Debian's and Ubuntu's Chromium; never a browser Playwright downloads.
CHROMIUM = next((found for found in map(shutil.which, ("chromium", "chromium-browser")) if found), None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _browser_missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "needs the playwright package (the [test] extra)"
    if CHROMIUM is None:
        return "needs the system's Chromium (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("page-photo") / "garden.png"
    Image.fromarray(scene(np.random.default_rng(44), 320, 240)).save(path)
    return path


@pytest.fixture(scope="module")
def labelled(calibrated_weights: Any, photo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The calibrated weights and a label file in which the photo's top-1 class is named like an HTML tag."""
    weights = calibrated_weights("MixNet_S")
    top = Classifier(weights=weights).classify(photo).predictions[0].class_id
    names = list(imagenet_labels())
    names[top] = HOSTILE_LABEL
    labels = tmp_path_factory.mktemp("page-labels") / "labels.txt"
    labels.write_text("\n".join(names) + "\n", encoding="utf-8")
    return weights, labels


@pytest.fixture(scope="module")
def service(labelled: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    weights, labels = labelled
    home = tmp_path_factory.mktemp("page-home")
    # Your own weights: nothing is downloaded, so the mirror is never asked.
    server = ServerProcess(home, "http://127.0.0.1:9", tmp_path_factory.mktemp("page-logs") / "serve.log",
                           "--weights", str(weights), "--labels", str(labels))
    try:
        server.wait_for("/readyz", 200)
        yield server
    finally:
        server.stop()


def test_cam_in_the_json(service: ServerProcess, labelled: tuple[Path, Path], photo: Path):
    weights, labels = labelled
    api = Classifier(weights=weights, labels=labels).classify(photo, cam=True)
    answer = service.post("?cam=1", data=photo.read_bytes())
    assert answer.status_code == 200, answer.text
    cam = answer.json()["cam"]
    assert answer.json()["architecture"] == "MixNet_S" != answer.json()["model"]  # own weights: named by the file
    assert cam["class_id"] == api.cam_class and cam["label"] == HOSTILE_LABEL
    assert np.allclose(np.asarray(cam["grid"], dtype=np.float64), api.cam, rtol=1e-5, atol=1e-5)
    assert cam["photo_size"] == [320, 240]
    assert cam["crop"] == list(crop_region(320, 240, resolve_model("MixNet_S").preprocessing))
    chosen = service.post("?cam_class=5", data=photo.read_bytes()).json()
    assert chosen["cam"]["class_id"] == 5 and chosen["predictions"] == answer.json()["predictions"]
    assert chosen["architecture"] == "MixNet_S"
    several = service.post("?cam=1", files=[("image", ("a.png", photo.read_bytes())),
                                            ("image", ("b.png", photo.read_bytes())),
                                            ("image", ("c.png", b"not an image"))])
    assert [row["cam"]["grid"] for row in several.json()[:2]] == [cam["grid"]] * 2
    assert "error" in several.json()[2] and several.json()[2]["architecture"] == "MixNet_S"
    assert "cam" not in service.post("", data=photo.read_bytes()).json()
    for query, words in [("?cam_class=1000", "0 to 999"), ("?cam=2", "cam must be 1 or 0"), ("?cam_class=x", "")]:
        refused = service.post(query, data=photo.read_bytes())
        assert refused.status_code == 400 and words in refused.json()["error"]["message"], refused.text


def test_the_page_is_one_static_file(service: ServerProcess):
    page = service.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "unsafe" not in policy and "connect-src 'self'" in policy
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*\bhref=|https?://", page.text), "nothing from elsewhere"
    table = re.search(r'INFERNO_HEX = "([0-9a-f]+)"', page.text)
    assert table is not None and bytes.fromhex(table.group(1)) == INFERNO.tobytes(), "the pictures' colours"


@pytest.mark.browser
@pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")
def test_the_page_in_a_browser(service: ServerProcess, photo: Path, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    answer = service.post("?cam=1", data=photo.read_bytes()).json()
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1000, "height": 700})
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
            page.goto(service.url + "/")
            page.set_input_files("#files", str(photo))
            page.wait_for_selector(".result[data-state=done]", timeout=60_000)
            shown = [(int(button.get_attribute("data-class-id")), button.query_selector(".label").text_content(),
                      float(button.get_attribute("data-score"))) for button in page.query_selector_all(".prediction")]
            assert shown == [(p["class_id"], p["label"], p["score"]) for p in answer["predictions"]]
            # The label that looks like a tag is text: no element made of it, no script run by it.
            assert shown[0][1] == HOSTILE_LABEL
            assert page.query_selector(".result img") is None
            assert page.evaluate("() => window.__injected === undefined")
            caption = page.query_selector(".cam-class")
            assert caption.get_attribute("data-class-id") == str(answer["cam"]["class_id"])
            assert HOSTILE_LABEL in caption.text_content()
            # The map is drawn over the crop: the photo outside it dimmed.
            width, height, corner, middle = page.evaluate("""() => {
                const canvas = document.querySelector(".result canvas");
                const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
                const at = (x, y) => {
                    const start = (y * canvas.width + x) * 4;
                    return Array.from(pixels.slice(start, start + 3));
                };
                return [canvas.width, canvas.height, at(2, 2), at(160, 120)];
            }""")
            assert (width, height) == (320, 240)
            original = np.asarray(Image.open(photo).convert("RGB"), dtype=np.float64)
            assert np.abs(np.asarray(corner) - 0.35 * original[2, 2]).max() <= 3
            assert np.abs(np.asarray(middle) - original[120, 160]).max() > 3
            # Another class's map, picked from the bars.
            third = page.query_selector_all(".prediction")[2]
            chosen = third.get_attribute("data-class-id")
            third.click()
            page.wait_for_selector(f".cam-class[data-class-id='{chosen}']", timeout=60_000)
            page.wait_for_selector(".result[data-state=done]", timeout=60_000)
            assert "chosen" in (page.query_selector_all(".prediction")[2].get_attribute("class") or "")
            # A file that is not an image gets the service's message, as text, in its own card.
            broken = tmp_path / "notes.png"
            broken.write_bytes(b"<b>not an image</b>")
            page.set_input_files("#files", str(broken))
            page.wait_for_selector(".result[data-state=error]", timeout=60_000)
            message = page.query_selector(".result[data-state=error] .status").text_content()
            assert message.startswith("notes.png: not an image")
            screenshot = tmp_path / "page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            with Image.open(screenshot) as image:
                assert image.size[0] >= 1000 and image.size[1] >= 500
            assert problems == []
        finally:
            browser.close()
