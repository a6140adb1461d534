"""The networks mixnet builds are PaddleClas's MixNet_S/M/L: their parameter counts and FLOPs are the published
ones, and the manifest's figures agree with the architecture."""

from __future__ import annotations

import pytest

from mixnet_cli.manifest import load_manifest, resolve_model
from mixnet_cli.model import build_network

# Counted on paddleclas 2.6.0; the same as PaddleClas's MixNet page (4.167 / 5.056 / 7.384 M parameters,
# 252.977 / 357.119 / 579.017 MFLOPs; the page's 5.065 for M swaps two digits).
EXPECTED = {
    "MixNet_S": (4_166_798, 252_977_198),
    "MixNet_M": (5_056_094, 357_118_822),
    "MixNet_L": (7_383_524, 579_017_060),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def counted(request: pytest.FixtureRequest) -> tuple[str, int, int]:
    import paddle

    network = build_network(resolve_model(request.param))
    params = sum(int(p.numel()) for p in network.parameters())
    flops = int(paddle.flops(network, [1, 3, 224, 224], print_detail=False))
    return request.param, params, flops


def test_manifest_lists_the_three_models() -> None:
    assert sorted(load_manifest().models) == sorted(EXPECTED)


def test_parameter_count_is_paddleclas(counted: tuple[str, int, int]) -> None:
    name, params, _ = counted
    assert params == EXPECTED[name][0]


def test_flops_are_paddleclas(counted: tuple[str, int, int]) -> None:
    name, _, flops = counted
    assert flops == EXPECTED[name][1]


def test_manifest_metrics_match_the_architecture(counted: tuple[str, int, int]) -> None:
    name, params, flops = counted
    metrics = load_manifest().models[name].metrics
    assert metrics.params_m == round(params / 1e6, 3)
    assert metrics.flops_m == round(flops / 1e6, 3)
