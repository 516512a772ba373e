"""The in-memory encoder mesh (2 virtual CPU devices, tests/conftest.py) against one device.

Five tiles over two shards: shard sizes 3 and 2, one padded row, so padding and masking are exercised.
The tests that claim one device's gradients run in float64 (tests/parallel/helpers.py: ``EXACT``).
More devices: tests/parallel/test_distributed.py runs the same check on 4 devices in a subprocess.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bigjax.parallel import ShardLayout, encoder_mesh, mesh_value_and_grad
from tests.parallel.helpers import (EXACT, LABEL, TILES, assert_close, cosine, float64, head,
                                    one_device, per_shard_reference, per_shard_running_stats, rel,
                                    tiny_resnet, to_float64)

TILES64 = TILES.astype(np.float64)


def _models(name="abmil", **kwargs):
    """The tiny encoder and a head, float64 (call inside ``float64()``)."""
    return to_float64(tiny_resnet), to_float64(head, name, **kwargs)


@pytest.fixture(scope="module")
def reference():
    """One device's loss, gradients and running statistics, float64."""
    with float64():
        encoder, agg = _models()
        loss, (g_enc, g_head) = one_device(encoder, agg, TILES64)
        return loss, g_enc, g_head, nnx.state(encoder, nnx.BatchStat)


def _mesh(encoder, agg, tiles=TILES64, **kwargs):
    return mesh_value_and_grad(encoder, agg, tiles, LABEL, mesh=encoder_mesh(2), dtype=jnp.float64,
                               **kwargs)


def _assert_one_device(reference, loss, g_enc, g_head, encoder):
    loss0, g_enc0, g_head0, stats0 = reference
    assert rel(loss, loss0) < EXACT
    assert_close(g_enc, g_enc0, EXACT)
    assert_close(g_head, g_head0, EXACT)
    assert_close(nnx.state(encoder, nnx.BatchStat), stats0, EXACT)


@pytest.mark.parametrize("collectives", ["explicit", "xla"])
def test_mesh_gradients_equal_one_device_with_synchronised_batch_norm(reference, collectives):
    """Campanella et al.'s Fig. 3 on two devices: loss, every gradient, the running statistics."""
    with float64():
        encoder, agg = _models()
        loss, (g_enc, g_head) = _mesh(encoder, agg, collectives=collectives)
        _assert_one_device(reference, loss, g_enc, g_head, encoder)


@pytest.mark.parametrize("remat", ["block", pytest.param("conv", marks=pytest.mark.slow)])
def test_remat_gives_the_same_gradients_and_running_statistics(reference, remat):
    with float64():
        encoder, agg = _models()
        loss, (g_enc, g_head) = _mesh(encoder, agg, remat=remat)
        _assert_one_device(reference, loss, g_enc, g_head, encoder)


def test_an_unknown_remat_is_refused_by_name():
    with pytest.raises(ValueError, match="remat='layer'"):
        mesh_value_and_grad(tiny_resnet(), head(), TILES, LABEL, mesh=encoder_mesh(2), remat="layer")


@pytest.mark.slow
@pytest.mark.parametrize("collectives", ["explicit", "xla"])
def test_gma_with_dropout_on_the_mesh_equals_one_device(collectives):
    """The replicated aggregator draws the same dropout masks on every shard as on one device."""
    with float64():
        ref_head = to_float64(head, "gma", dropout=0.25)
        loss0, (g_enc0, g_head0) = one_device(to_float64(tiny_resnet), ref_head, TILES64)
        encoder, agg = _models("gma", dropout=0.25)
        loss, (g_enc, g_head) = _mesh(encoder, agg, collectives=collectives)
    assert rel(loss, loss0) < EXACT
    assert_close(g_enc, g_enc0, EXACT)
    assert_close(g_head, g_head0, EXACT)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.all(np.asarray(a) == np.asarray(b))),
                                     nnx.state(agg, nnx.RngCount), nnx.state(ref_head, nnx.RngCount)))


@pytest.mark.slow
def test_five_adam_steps_on_the_mesh_take_the_one_device_losses():
    def train(grads_of):
        encoder, agg = _models()
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

    with float64():  # float32 round-off, amplified by Adam's near-sign steps, would be measured
        ours = train(lambda e, h: _mesh(e, h))
        theirs = train(lambda e, h: one_device(e, h, TILES64))
    assert np.all(np.diff(theirs) < 0)  # the steps do something
    np.testing.assert_allclose(ours, theirs, rtol=EXACT)


def test_per_shard_batch_norm_differs_and_equals_each_shard_on_its_own(reference):
    loss_sync, g_enc_sync = reference[0], reference[1]
    shards = ShardLayout(len(TILES64), 2).split(TILES64)
    with float64():
        loss0, (g_enc0, g_head0) = per_shard_reference(*_models(), shards)
        stats0 = per_shard_running_stats(to_float64(tiny_resnet), shards)
        encoder, agg = _models()
        loss, (g_enc, g_head) = _mesh(encoder, agg, sync_bn=False)
    assert rel(loss, loss_sync) > 1e-4  # 4.6e-4 under the heads' PyTorch init; exact is 1e-10
    assert rel(g_enc["conv1"]["kernel"], g_enc_sync["conv1"]["kernel"]) > 1e-3
    assert rel(loss, loss0) < EXACT
    assert_close(g_enc, g_enc0, EXACT)
    assert_close(g_head, g_head0, EXACT)
    assert_close(nnx.state(encoder, nnx.BatchStat), stats0, EXACT)


def test_bfloat16_compute_is_close_to_float32(reference):
    loss0, g_enc0, g_head0, _ = reference
    encoder, agg = tiny_resnet(), head()
    loss, (g_enc, g_head) = mesh_value_and_grad(encoder, agg, TILES, LABEL, mesh=encoder_mesh(2),
                                                dtype=jnp.bfloat16)
    assert loss.dtype == jnp.float32 and 1e-6 < rel(loss, loss0) < 1e-2  # really ran in bf16
    assert_close(g_enc, g_enc0, 0.5, np.float32)  # parameters and gradients stay float32
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
    tiles = TILES64[:n_tiles]
    with float64():
        loss0, (g_enc0, g_head0) = one_device(to_float64(_NoBatchNorm), to_float64(head, in_dim=16),
                                              tiles)
        loss, (g_enc, g_head) = _mesh(to_float64(_NoBatchNorm), to_float64(head, in_dim=16), tiles)
    assert rel(loss, loss0) < EXACT
    assert_close(g_enc, g_enc0, EXACT)
    assert_close(g_head, g_head0, EXACT)


def test_unknown_collectives_are_named():
    with pytest.raises(ValueError, match="'nccl'"):
        mesh_value_and_grad(_NoBatchNorm(), head(in_dim=16), TILES, LABEL, collectives="nccl")
