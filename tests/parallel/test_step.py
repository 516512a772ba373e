"""The in-memory encoder mesh (2 virtual CPU devices, tests/conftest.py) against one device.

Five tiles over two shards: shard sizes 3 and 2, one padded row, so padding and masking are exercised.
More devices: tests/parallel/test_distributed.py runs the same check on 4 devices in a subprocess.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bigjax.parallel import ShardLayout, encoder_mesh, mesh_value_and_grad
from tests.parallel.helpers import (LABEL, TILES, assert_close, cosine, head, one_device,
                                    per_shard_reference, per_shard_running_stats, rel, tiny_resnet)


@pytest.fixture(scope="module")
def reference():
    encoder, agg = tiny_resnet(), head()
    loss, (g_enc, g_head) = one_device(encoder, agg)
    return loss, g_enc, g_head, nnx.state(encoder, nnx.BatchStat)


@pytest.mark.parametrize("collectives", ["explicit", "xla"])
def test_mesh_gradients_equal_one_device_with_synchronised_batch_norm(reference, collectives):
    """Campanella et al.'s Fig. 3 on two devices: loss, every gradient, the running statistics."""
    loss0, g_enc0, g_head0, stats0 = reference
    encoder, agg = tiny_resnet(), head()
    loss, (g_enc, g_head) = mesh_value_and_grad(encoder, agg, TILES, LABEL, mesh=encoder_mesh(2),
                                                collectives=collectives)
    assert rel(loss, loss0) < 1e-6
    assert_close(g_enc, g_enc0, 1e-5)
    assert_close(g_head, g_head0, 1e-5)
    assert_close(nnx.state(encoder, nnx.BatchStat), stats0, 1e-6)


@pytest.mark.parametrize("remat", ["block", pytest.param("conv", marks=pytest.mark.slow)])
def test_remat_gives_the_same_gradients_and_running_statistics(reference, remat):
    loss0, g_enc0, g_head0, stats0 = reference
    encoder = tiny_resnet()
    loss, (g_enc, g_head) = mesh_value_and_grad(encoder, head(), TILES, LABEL,
                                                mesh=encoder_mesh(2), remat=remat)
    assert rel(loss, loss0) < 1e-6
    assert_close(g_enc, g_enc0, 1e-5)
    assert_close(g_head, g_head0, 1e-5)
    assert_close(nnx.state(encoder, nnx.BatchStat), stats0, 1e-6)


def test_an_unknown_remat_is_refused_by_name():
    with pytest.raises(ValueError, match="remat='layer'"):
        mesh_value_and_grad(tiny_resnet(), head(), TILES, LABEL, mesh=encoder_mesh(2), remat="layer")


@pytest.mark.slow
@pytest.mark.parametrize("collectives", ["explicit", "xla"])
def test_gma_with_dropout_on_the_mesh_equals_one_device(collectives):
    """The replicated aggregator draws the same dropout masks on every shard as on one device."""
    loss0, (g_enc0, g_head0) = one_device(tiny_resnet(), ref_head := head("gma", dropout=0.25))
    agg = head("gma", dropout=0.25)
    loss, (g_enc, g_head) = mesh_value_and_grad(tiny_resnet(), agg, TILES, LABEL,
                                                mesh=encoder_mesh(2), collectives=collectives)
    assert rel(loss, loss0) < 1e-6
    assert_close(g_enc, g_enc0, 1e-5)
    assert_close(g_head, g_head0, 1e-5)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.all(np.asarray(a) == np.asarray(b))),
                                     nnx.state(agg, nnx.RngCount), nnx.state(ref_head, nnx.RngCount)))


@pytest.mark.slow
def test_five_adam_steps_on_the_mesh_take_the_one_device_losses():
    def train(grads_of):
        encoder, agg = tiny_resnet(), head()
        params = (nnx.state(encoder, nnx.Param), nnx.state(agg, nnx.Param))
        opt = optax.adam(1e-3)
        state, losses = opt.init(params), []
        for _ in range(5):
            loss, grads = grads_of(encoder, agg)
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            nnx.update(encoder, params[0])
            nnx.update(agg, params[1])
            losses.append(float(np.asarray(loss)))
        return np.array(losses)

    ours = train(lambda e, h: mesh_value_and_grad(e, h, TILES, LABEL, mesh=encoder_mesh(2)))
    theirs = train(lambda e, h: one_device(e, h))
    assert np.all(np.diff(theirs) < 0)  # the steps do something
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_per_shard_batch_norm_differs_and_equals_each_shard_on_its_own(reference):
    loss_sync, g_enc_sync = reference[0], reference[1]
    encoder, agg = tiny_resnet(), head()
    shards = ShardLayout(len(TILES), 2).split(TILES)
    loss0, (g_enc0, g_head0) = per_shard_reference(tiny_resnet(), head(), shards)
    stats0 = per_shard_running_stats(tiny_resnet(), shards)
    loss, (g_enc, g_head) = mesh_value_and_grad(encoder, agg, TILES, LABEL, mesh=encoder_mesh(2),
                                                sync_bn=False)
    assert rel(loss, loss_sync) > 1e-3
    assert rel(g_enc["conv1"]["kernel"], g_enc_sync["conv1"]["kernel"]) > 1e-3
    assert rel(loss, loss0) < 1e-6
    assert_close(g_enc, g_enc0, 1e-5)
    assert_close(g_head, g_head0, 1e-5)
    assert_close(nnx.state(encoder, nnx.BatchStat), stats0, 1e-6)


def test_bfloat16_compute_is_close_to_float32(reference):
    loss0, g_enc0, g_head0, _ = reference
    encoder, agg = tiny_resnet(), head()
    loss, (g_enc, g_head) = mesh_value_and_grad(encoder, agg, TILES, LABEL, mesh=encoder_mesh(2),
                                                dtype=jnp.bfloat16)
    assert loss.dtype == jnp.float32 and 1e-6 < rel(loss, loss0) < 1e-2  # really ran in bf16
    assert_close(g_enc, g_enc0, 0.5)  # parameters and gradients stay float32 (checked inside)
    # bf16 keeps ~3 digits; through BatchNorm over five tiles the encoder gradient moves ~15% (L2),
    # its direction ~1%
    assert cosine(g_enc, g_enc0) > 0.98 and cosine(g_head, g_head0) > 0.999


class _NoBatchNorm(nnx.Module):
    """A tile encoder without BatchNorm: its tiles do not interact."""

    def __init__(self):
        self.linear = nnx.Linear(29 * 27 * 3, 16, rngs=nnx.Rngs(4))

    def __call__(self, x, *, train):
        return jax.nn.relu(self.linear(x.reshape(len(x), -1)))


@pytest.mark.parametrize("n_tiles", [5, 1])  # 1 tile on 2 devices: one shard is all padding
def test_encoder_without_batch_norm_on_the_mesh(n_tiles):
    tiles = TILES[:n_tiles]
    loss0, (g_enc0, g_head0) = one_device(_NoBatchNorm(), head(in_dim=16), tiles)
    loss, (g_enc, g_head) = mesh_value_and_grad(_NoBatchNorm(), head(in_dim=16), tiles, LABEL,
                                                mesh=encoder_mesh(2))
    assert rel(loss, loss0) < 1e-6
    assert_close(g_enc, g_enc0, 1e-5)
    assert_close(g_head, g_head0, 1e-5)


def test_unknown_collectives_are_named():
    with pytest.raises(ValueError, match="'nccl'"):
        mesh_value_and_grad(_NoBatchNorm(), head(in_dim=16), TILES, LABEL, collectives="nccl")
