"""The network mixnet builds is PaddleClas's MixNet_S/M/L: its parameter counts and FLOPs are the published ones,
its parameter names and shapes are paddleclas's, and the manifest's figures agree with the architecture."""

from __future__ import annotations

import pytest

from mixnet_cli.network.architecture import architecture_of, build_architecture, round_channels, split_channels
from mixnet_cli.base.errors import ManifestError, WeightsError
from mixnet_cli.base.manifest import load_manifest

# Counted on paddleclas 2.6.0 (sum of numel, paddle.flops); the same as PaddleClas's MixNet page (4.167 / 5.056 /
# 7.384 M parameters, 252.977 / 357.119 / 579.017 MFLOPs; the page's 5.065 for M swaps two digits).
EXPECTED = {
    "MixNet_S": (4_166_798, 252_977_198),
    "MixNet_M": (5_056_094, 357_118_822),
    "MixNet_L": (7_383_524, 579_017_060),
}


def test_manifest_lists_the_three_models() -> None:
    assert sorted(load_manifest().models) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_count_and_flops_are_paddleclas(name: str) -> None:
    architecture = architecture_of(name)
    assert (architecture.parameter_count(), architecture.flops()) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_manifest_metrics_match_the_architecture(name: str) -> None:
    metrics = load_manifest().models[name].metrics
    params, flops = EXPECTED[name]
    assert metrics.params_m == round(params / 1e6, 3)
    assert metrics.flops_m == round(flops / 1e6, 3)


def test_paddleclas_rounding_and_splits() -> None:
    assert [round_channels(c * 1.3) for c in (24, 32, 40, 80, 120, 200)] == [32, 40, 56, 104, 160, 264]
    assert split_channels(10, 3) == (4, 3, 3) and split_channels(240, 4) == (60, 60, 60, 60)


def test_an_unknown_block_table_is_named() -> None:
    with pytest.raises(ManifestError, match="unknown MixNet block table 'xl'"):
        build_architecture("MixNet_XL", "xl", 1.0)


def test_l_is_m_at_width_1_3_with_the_final_block_unscaled() -> None:
    medium, large = architecture_of("MixNet_M"), architecture_of("MixNet_L")
    assert len(medium.units) == len(large.units)
    assert large.stem.out_channels == 32 and large.final.out_channels == medium.final.out_channels == 1536
    assert [u.residual for u in medium.units] == [u.residual for u in large.units]


def test_a_state_dict_that_does_not_fit_is_named() -> None:
    architecture = architecture_of("MixNet_S")
    state = {name: _Shaped(shape) for name, shape in architecture.shapes().items()}
    architecture.check_state_dict(state)
    del state["output.bias"]
    state["features.final_block.conv.weight"] = _Shaped((1, 1))
    state["extra"] = _Shaped((1,))
    with pytest.raises(WeightsError) as failure:
        architecture.check_state_dict(state)
    assert str(failure.value) == (
        "does not hold MixNet_S weights: 1 parameters missing (e.g. output.bias); 1 unknown parameters (e.g. extra); "
        "1 of the wrong shape (e.g. features.final_block.conv.weight: (1, 1), expected (1536, 200, 1, 1))"
    )


class _Shaped:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


@pytest.mark.paddle
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_names_shapes_and_counts_equal_paddleclas(name: str) -> None:
    import paddle

    from mixnet_cli.base.manifest import resolve_model
    from mixnet_cli.network.paddle_network import build_network

    network = build_network(resolve_model(name))
    assert {key: tuple(value.shape) for key, value in network.state_dict().items()} == architecture_of(name).shapes()
    params = sum(int(p.numel()) for p in network.parameters())
    flops = int(paddle.flops(network, [1, 3, 224, 224], print_detail=False))
    assert (params, flops) == EXPECTED[name]
