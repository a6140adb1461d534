from __future__ import annotations

import json

from click.testing import CliRunner
from PIL import Image

from mixnet_cli.cli import main


def test_classify_downloads_then_uses_cache(tmp_path, random_mirror, isolated_home):
    image = tmp_path / "grey.png"
    Image.new("RGB", (300, 200), (120, 130, 140)).save(image)
    runner = CliRunner()
    first = runner.invoke(main, ["classify", str(image), "--json"])
    assert first.exit_code == 0, first.output
    rows = json.loads(first.stdout)
    assert rows[0]["input"] == str(image) and len(rows[0]["predictions"]) == 5
    assert len(random_mirror.requests) == 1
    second = runner.invoke(main, ["classify", str(image), "--json"])
    assert second.exit_code == 0
    assert len(random_mirror.requests) == 1, "a second run must not touch the network"
    assert json.loads(second.stdout) == rows
