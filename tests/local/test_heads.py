"""The gated-attention heads: shapes, attention over the reduced positions, Big path equal in memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.layers import Execution
from bigjax.local.heads import aux_head, final_head
from bigjax.models.resnet_paths import Fused, InMemory

X = np.random.default_rng(0).normal(size=(1, 13, 11, 8)).astype(np.float32)


def test_official_sizes():
    head = aux_head(128, 3, rngs=nnx.Rngs(0))
    assert head.kernel == 9 and head.fc1.out_features == 128
    assert head.score.tanh_branch.out_features == 64 and head.score.gate_branch is not None
    h = final_head(2, rngs=nnx.Rngs(0))
    assert h.kernel == 5 and h.fc1.out_features == 512 and h.score.tanh_branch.out_features == 128
    with pytest.raises(ValueError, match="no official auxiliary-head kernel for 32"):
        aux_head(32, 2, rngs=nnx.Rngs(0))


def test_head_pools_the_reduced_positions():
    head = aux_head(8, 3, kernel=3, rngs=nnx.Rngs(0))
    assert head.positions(InMemory, X).shape == (4 * 3, 8)   # 13x11 by a 3x3/3 conv
    assert head(InMemory, X, train=False).shape == (3,)
    with pytest.raises(ValueError, match="at least 3x3"):
        head(InMemory, X[:, :2], train=False)


def test_a_map_that_leaves_the_head_one_position_is_refused():
    head = aux_head(8, 3, kernel=6, rngs=nnx.Rngs(0))  # 13x11 by a 6x6/6 conv: 2x1 positions
    assert head.positions(InMemory, X).shape == (2, 8)
    with pytest.raises(ValueError, match="one position, whose per-channel GroupNorm is 0"):
        head(InMemory, X[:, :11], train=False)  # 11x11: 1x1


def test_big_path_head_equals_in_memory():
    head = aux_head(8, 3, kernel=2, rngs=nnx.Rngs(1))
    bands = []

    def count(event, fn, *args, **kwargs):
        bands.append(event == "take_band")
        return fn(*args, **kwargs)

    ex = Execution(6_000, observer=count)

    def loss(path, x):
        return lambda h: jnp.sum(h(path, x, train=False) ** 2)

    g_mem = nnx.grad(loss(InMemory, jnp.asarray(X)))(head)
    g_big = nnx.grad(loss(Fused(ex), ex.to_host(X)))(head)
    assert sum(bands) >= 3
    for a, b in zip(jax.tree.leaves(g_big), jax.tree.leaves(g_mem), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # ~100 s on the loaded machine: the tiny network's eager compiles
def test_head_logits_are_every_head_in_order_and_end_with_predict():
    from bigjax.local import paths_for
    from tests.local.helpers import X, tiny_network

    net = tiny_network(4)
    paths = paths_for(None, 4)
    logits = net.head_logits(paths, X)
    assert len(logits) == 4 and all(l.shape == (3,) for l in logits)
    np.testing.assert_allclose(np.asarray(logits[-1]), np.asarray(net.predict(paths, X)), rtol=1e-6)
    x = net.stem(paths[0], X)
    x = net.local_modules[0].features(paths[0], x, bn_train=False)
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(
        net.local_modules[0].head(paths[0], x, train=False)), rtol=1e-6)
