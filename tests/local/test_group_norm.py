"""Zhang's GroupNorm variant: GroupNorm(C, C) on every path, and module isolation with it."""

import jax
import numpy as np
import pytest
from flax import nnx

from bigjax.layers import Execution
from bigjax.layers.modules import BigBatchNorm, BigConv
from bigjax.local import paths_for
from bigjax.local.group_norm import BigGroupNorm, to_group_norm
from bigjax.models.resnet import BasicBlock
from bigjax.models.resnet_paths import Fused, Separate
from tests.local.helpers import LABEL, tiny_network

RNG = np.random.default_rng(3)


def _group_norm(c=6):
    gn = BigGroupNorm(c)
    gn.scale[...] = RNG.uniform(0.5, 1.5, c).astype(np.float32)
    gn.bias[...] = RNG.normal(0, 0.3, c).astype(np.float32)
    return gn


def _reference(x, scale, bias, eps=1e-5):
    """Per map and channel: (x − mean) / sqrt(biased var + eps), then the affine (float64)."""
    x = np.asarray(x, np.float64)
    mean, var = x.mean(axis=(1, 2), keepdims=True), x.var(axis=(1, 2), keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias)


def test_in_memory_group_norm_normalises_each_map_by_its_own_statistics():
    gn = _group_norm()
    x = (RNG.normal(size=(3, 7, 5, 6)) * RNG.uniform(0.5, 4, 6) + RNG.normal(0, 2, 6)).astype(np.float32)
    expected = _reference(x, gn.scale[...], gn.bias[...])
    np.testing.assert_allclose(gn.plain(x, train=True), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gn.plain(x, train=False), expected, rtol=1e-4, atol=1e-5)  # no running stats
    flax_gn = nnx.GroupNorm(6, num_groups=6, epsilon=1e-5, rngs=nnx.Rngs(0))
    flax_gn.scale[...], flax_gn.bias[...] = gn.scale[...], gn.bias[...]
    np.testing.assert_allclose(gn.plain(x, train=True), flax_gn(x), rtol=1e-4, atol=1e-5)


def test_big_paths_give_the_group_norm_of_one_map():
    """Separate (two streamed passes) and Fused (statistics from the conv's pass), many bands."""
    gn, conv = _group_norm(), BigConv(3, 6, 3, padding=1, rngs=nnx.Rngs(1))
    x = RNG.normal(size=(1, 23, 9, 3)).astype(np.float32)
    expected = _reference(conv.plain(x), gn.scale[...], gn.bias[...])
    bands = []

    def count(event, fn, *args, **kwargs):
        bands.append(event)
        return fn(*args, **kwargs)

    ex = Execution(5_000, observer=count)
    separate = Separate(ex).conv_bn(x, conv, gn, False)
    np.testing.assert_allclose(jax.device_get(separate), expected, rtol=1e-4, atol=1e-4)
    folded = Fused(ex).conv_bn(x, conv, gn, False)
    fused = np.asarray(folded.y) * np.asarray(folded.a) + np.asarray(folded.b)
    np.testing.assert_allclose(fused, expected, rtol=1e-4, atol=1e-4)
    assert bands.count("take_band") > 8
    with pytest.raises(ValueError, match="one map \\(batch 1\\), got shape \\(2, 23, 9, 6\\)"):
        gn(np.concatenate([expected, expected]).astype(np.float32), train=True, execution=ex)


class _TinyResNet(nnx.Module):
    """A ResNet's layout in small: the stem's BatchNorm, blocks in a list, a projection shortcut."""

    def __init__(self, rngs):
        self.conv1, self.bn1 = BigConv(3, 4, 3, rngs=rngs), BigBatchNorm(4)
        self.layer1 = nnx.List([BasicBlock(4, 4, 1, rngs), BasicBlock(4, 8, 2, rngs)])


def test_every_backbone_batch_norm_becomes_group_norm():
    resnet = _TinyResNet(nnx.Rngs(0))
    resnet.layer1[1].downsample[1].scale[...] = np.full(8, 3.0, np.float32)
    to_group_norm(resnet)
    norms = [type(m) for _, m in nnx.iter_modules(resnet) if isinstance(m, (BigBatchNorm, BigGroupNorm))]
    assert len(norms) == 1 + 2 * 2 + 1 and set(norms) == {BigGroupNorm}  # stem, blocks, shortcut
    assert not nnx.state(resnet, nnx.BatchStat)
    assert float(resnet.layer1[1].downsample[1].scale[...].max()) == 1.0  # fresh affine, as torch


def _group_norm_network():
    """The tiny network with GroupNorm in its stem and blocks; the RFR decoders keep BatchNorm."""
    net = tiny_network(2)
    for m in net.local_modules:
        to_group_norm(m.blocks)
    net.bn1 = BigGroupNorm(8)
    return net


# larger than helpers.X: H's 2x2/2 reducing conv must leave more than one position, or its
# GroupNorm (one group per channel, as the official head) outputs its bias and passes no gradient
X_GN = np.random.default_rng(4).normal(size=(1, 97, 77, 3)).astype(np.float32)


@pytest.mark.slow
def test_no_gradient_crosses_a_module_boundary_with_group_norm():
    net = _group_norm_network()
    assert isinstance(net.local_modules[0].decoder.norm, BigBatchNorm)
    X = X_GN
    plan = net.sample(np.random.default_rng(1), X.shape)
    paths = paths_for(None, 2)
    for i in range(2):
        grads = nnx.jit(nnx.grad(lambda n: n.losses(paths, X, LABEL, plan)[i]))(nnx.clone(net))
        for j in range(2):
            norms = [leaf for path, leaf in jax.tree.leaves_with_path(grads["local_modules"][j])
                     if "blocks" in jax.tree_util.keystr(path) and "bn" in jax.tree_util.keystr(path)]
            leaves = jax.tree.leaves(grads["local_modules"][j])
            assert (i == j) == any(np.any(np.asarray(v)) for v in leaves), f"∂L_{i + 1}/∂θ_{j + 1}"
            assert norms and (i == j) == all(np.any(np.asarray(v)) for v in norms)
        assert not any(np.any(np.asarray(v)) for v in jax.tree.leaves(grads["bn1"]))  # frozen stem
