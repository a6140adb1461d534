"""Make README's two pictures of class activation maps with the tool itself, from a generated photo:
``docs/squares.cam.png`` (``mixnet classify --cam``) and ``docs/cam-page.png`` (the page of ``mixnet serve``, in
the system's Chromium). The weights are the tests' calibrated MixNet_S with a classifier fitted to see coloured
squares (tests/weightgen.py), so the maps have something to show.

    PYTHONPATH=.:tests python docs/make_cam_pictures.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from weightgen import SQUARE_COLOURS, make_calibrated_weights, make_square_weights, square_photo

DOCS = Path(__file__).resolve().parent
COLOURS = tuple(SQUARE_COLOURS)


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        calibrated = make_calibrated_weights("MixNet_S", work / "MixNet_S_pretrained.pdparams")
        weights = make_square_weights(calibrated, work / "squares.pdparams", COLOURS)
        labels = work / "labels.txt"
        labels.write_text("\n".join(["background", *COLOURS]) + "\n")
        # A landscape photo: a red square in the crop, a blue one too, and a yellow one outside the crop.
        photo = square_photo(560, 360, (190, 110, 250, 170), SQUARE_COLOURS["red square"])
        photo[220:270, 330:380] = SQUARE_COLOURS["blue square"]
        photo[150:200, 10:60] = SQUARE_COLOURS["yellow square"]
        ramp = np.linspace(0.85, 1.15, photo.shape[1])[None, :, None]  # light from the right, so it is a photo
        photo = np.clip(photo * ramp, 0, 255).astype(np.uint8)
        source = work / "squares.png"
        Image.fromarray(photo).save(source)
        env = {**os.environ, "MIXNET_HOME": str(work / "home")}
        subprocess.run([sys.executable, "-m", "mixnet_cli", "classify", str(source), "--weights", str(weights),
                        "--labels", str(labels), "--cam", str(DOCS)], check=True, env=env)
        _page_screenshot(source, weights, labels, env)


def _page_screenshot(photo: Path, weights: Path, labels: Path, env: dict[str, str]) -> None:
    from playwright.sync_api import sync_playwright

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mixnet_cli", "serve", "--port", str(port), "--weights",
                               str(weights), "--labels", str(labels)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if requests.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
            browser = playwright.chromium.launch_persistent_context(
                profile, executable_path="/usr/bin/chromium", headless=True, viewport={"width": 1000, "height": 560},
                args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            page.goto(url + "/")
            page.set_input_files("#files", str(photo))
            page.wait_for_selector(".result[data-state=done]", timeout=60_000)
            page.screenshot(path=str(DOCS / "cam-page.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
