"""The weights manifest: one source of truth, validated when loaded."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from mixnet_cli.base.errors import ManifestError, UnknownModelError
from mixnet_cli.base.manifest import load_manifest, parse_manifest, resolve_model

REPO = Path(__file__).resolve().parents[1]


def _raw() -> dict:
    from importlib import resources

    return json.loads(resources.files("mixnet_cli").joinpath("weights_manifest.json").read_text())


def test_repository_and_package_ship_the_same_manifest():
    root_copy = REPO / "weights_manifest.json"
    if not root_copy.exists():
        pytest.skip("not running from a source checkout")
    assert json.loads(root_copy.read_text()) == _raw()


def test_manifest_has_paddleclas_urls_and_seed_metrics():
    models = load_manifest().models
    assert list(models) == ["MixNet_S", "MixNet_M", "MixNet_L"]
    for name, spec in models.items():
        assert spec.url == f"https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/{name}_pretrained.pdparams"
        assert spec.filename == f"{name}_pretrained.pdparams"
        assert spec.sha256 is None and spec.size is None  # PaddleClas publishes neither
        pre = spec.preprocessing
        assert (pre.resize_short, pre.crop_size, pre.interpolation) == (256, 224, "cv2.INTER_LINEAR")
        assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
    assert (models["MixNet_M"].metrics.top1, models["MixNet_M"].metrics.params_m) == (77.67, 5.056)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.pop("schema_version"), "schema_version"),
        (lambda m: m["models"]["MixNet_S"].pop("url"), "has no 'url'"),
        (lambda m: m["models"]["MixNet_S"].__setitem__("url", "ftp://x/y"), "not an http"),
        (lambda m: m["models"]["MixNet_S"].__setitem__("sha256", "abc"), "sha256"),
        (lambda m: m["models"]["MixNet_S"].__setitem__("size", -5), "size"),
        (lambda m: m["models"]["MixNet_S"]["preprocessing"].__setitem__("std", [0.2, 0, 0.2]), "positive"),
        (lambda m: m["models"]["MixNet_S"]["metrics"].__setitem__("top1", "76"), "wrong type"),
        (lambda m: m["models"]["MixNet_S"]["architecture"].__setitem__("paddleclas", "no-colon"), "module:function"),
        (lambda m: m["models"]["MixNet_S"].__setitem__("architecture", "MixNet_S"), "wrong type"),
    ],
)
def test_malformed_manifest_is_rejected_naming_the_field(mutate, message):
    raw = copy.deepcopy(_raw())
    mutate(raw)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(raw)


def test_a_published_checksum_is_accepted():
    raw = copy.deepcopy(_raw())
    raw["models"]["MixNet_S"].update(sha256="a" * 64, size=16_702_799)
    spec = parse_manifest(raw).models["MixNet_S"]
    assert (spec.sha256, spec.size) == ("a" * 64, 16_702_799)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownModelError) as caught:
        resolve_model("mixnet_xl")
    assert str(caught.value) == ("unknown model 'mixnet_xl': did you mean MixNet_L? choose one of S (MixNet_S), "
                                 "M (MixNet_M), L (MixNet_L)")
    with pytest.raises(UnknownModelError) as caught:
        resolve_model("resnet50")  # nothing close: no guess
    assert str(caught.value) == "unknown model 'resnet50': choose one of S (MixNet_S), M (MixNet_M), L (MixNet_L)"
    assert resolve_model(" l ").name == "MixNet_L"
