"""The ResNet-34 split of Zhang et al.: 8 pieces, K modules, stem stride 3, RFR sizes."""

from types import SimpleNamespace

import pytest
from flax import nnx

from bigjax.layers import Execution
from bigjax.local import local_resnet34, paths_for
from bigjax.local.split import PIECE_CHANNELS, SPLITS, cut_pieces, module_pieces
from bigjax.models.resnet import ResNet
from bigjax.models.resnet_paths import Fused, InMemory


def test_modules_group_consecutive_pieces():
    assert module_pieces(4) == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert module_pieces(2) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert module_pieces(8) == tuple((i,) for i in range(8)) and module_pieces(1) == (tuple(range(8)),)
    with pytest.raises(ValueError, match=r"divide the 8 pieces evenly \(one of \[1, 2, 4, 8\]\), got 3"):
        module_pieces(3)


@pytest.fixture(scope="module")
def resnet34():
    return ResNet(34, rngs=nnx.Rngs(0))


def test_pieces_of_resnet34(resnet34):
    pieces = cut_pieces(resnet34)
    assert [len(p) for p in pieces] == [1, 1, 1, 2, 2, 3, 3, 3]
    assert [p[-1].conv2.kernel.shape[-1] for p in pieces] == list(PIECE_CHANNELS)
    assert pieces[3][0] is resnet34.layer2[0] and pieces[7][2] is resnet34.layer4[2]
    with pytest.raises(ValueError, match="ResNet-50"):
        cut_pieces(SimpleNamespace(depth=50))  # refused before any block is read


def test_pieces_of_resnet18_are_its_blocks():
    resnet18 = ResNet(18, rngs=nnx.Rngs(0))
    pieces = cut_pieces(resnet18)
    assert [len(p) for p in pieces] == [1] * 8
    assert [p[0].conv2.kernel.shape[-1] for p in pieces] == list(SPLITS[18][1])
    assert pieces[3][0] is resnet18.layer2[1] and pieces[6][0] is resnet18.layer4[0]


@pytest.mark.slow
@pytest.mark.parametrize("k, scales, patches", [(4, (1, 2, 2, 2), (128, 64, 32, 16)),
                                                (8, (1, 1, 1, 2, 1, 2, 1, 2),
                                                 (128, 128, 128, 64, 64, 32, 32, 16)),
                                                (2, (2, 4), (64, 16))])
def test_local_resnet34(resnet34, k, scales, patches):
    """Scales and patch sides as the official configurations (get_loss_cfg_4/8); stem stride 3."""
    net = local_resnet34(k, 2, resnet=resnet34, rngs=nnx.Rngs(0))
    assert net.conv1.geom.stride == (3, 3)
    assert tuple(m.scale for m in net.local_modules) == scales
    assert tuple(m.patch for m in net.local_modules) == patches
    assert all(m.decoder is not None for m in net.local_modules[:-1])
    assert net.local_modules[-1].decoder is None and net.local_modules[-1].head.kernel == 5
    assert sum(len(m.blocks) for m in net.local_modules) == 16


def test_one_execution_or_one_per_module():
    assert paths_for(None, 2) == [InMemory, InMemory]
    ex = Execution(10_000)
    assert paths_for(ex, 2) == [Fused(ex), Fused(ex)]
    with pytest.raises(ValueError, match=r"one per module \(2\), got 3"):
        paths_for([ex] * 3, 2)
