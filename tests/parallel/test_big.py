"""The encoder mesh with Big-Layers shards: two streaming engines (compute CPU 0 / host CPU 1 and
compute CPU 1 / host CPU 0) against one device's in-memory model with the same parameters."""

import jax
import pytest
from flax import nnx

from bigjax.layers import Execution
from bigjax.parallel import ShardLayout, big_mesh_value_and_grad
from bigjax.parallel.big import merge_shard_moments
from tests.parallel.helpers import (LABEL, TILES, assert_close, head, one_device,
                                    per_shard_reference, per_shard_running_stats, rel, tiny_resnet)

BUDGET = 1_400_000  # several row bands per image in the stem and stage 1


def _executions(kernel_devices, engine="eager"):
    devices = jax.devices()

    def observer(i):
        def observe(event, fn, *args, **kwargs):
            if event in ("conv_forward", "conv_backward"):
                kernel_devices[i].append(set().union(*(a.devices() for a in jax.tree.leaves(args)
                                                       if isinstance(a, jax.Array))))
            return fn(*args, **kwargs)
        return observe

    return [Execution(BUDGET, compute=devices[0], host=devices[1], observer=observer(0),
                      engine=engine),
            Execution(BUDGET, compute=devices[1], host=devices[0], observer=observer(1),
                      engine=engine)]


# the smaller case by default (stem and one block, 3 tiles: shards of 2 and 1); the larger is slow
@pytest.mark.parametrize("stages,n_tiles,engine", [
    (1, 3, "eager"), (1, 3, "compiled"), pytest.param(2, 5, "eager", marks=pytest.mark.slow)])
def test_big_shards_with_synchronised_batch_norm_equal_one_device(stages, n_tiles, engine):
    tiles = TILES[:n_tiles]
    loss0, (g_enc0, g_head0) = one_device(reference := tiny_resnet(stages=stages),
                                          head(in_dim=64 * stages), tiles)
    kernels = {0: [], 1: []}
    encoder, agg = tiny_resnet(big=True, stages=stages), head(in_dim=64 * stages)
    loss, (g_enc, g_head) = big_mesh_value_and_grad(encoder, agg, tiles, LABEL, sync_bn=True,
                                                    executions=_executions(kernels, engine))
    assert rel(loss, loss0) < 1e-6
    assert_close(g_enc, g_enc0, 1e-5)
    assert_close(g_head, g_head0, 1e-5)
    assert_close(nnx.state(encoder, nnx.BatchStat), nnx.state(reference, nnx.BatchStat), 1e-6)
    devices = jax.devices()
    assert all(d == {devices[i]} for i in (0, 1) for d in kernels[i])
    n_convs = 3 if stages == 1 else 6  # stem, layer1.0's two (layer2.0's two and its projection)
    # forward and backward: several bands per image (eager), one program per pass (compiled)
    assert len(kernels[0]) > 2 * n_convs if engine == "eager" else len(kernels[0]) >= 2 * n_convs


@pytest.mark.slow
def test_big_shards_with_per_shard_batch_norm_equal_each_shard_on_its_own():
    shards = ShardLayout(len(TILES), 2).split(TILES)
    loss0, (g_enc0, g_head0) = per_shard_reference(tiny_resnet(), head(), shards)
    encoder, agg = tiny_resnet(big=True), head()
    loss, (g_enc, g_head) = big_mesh_value_and_grad(encoder, agg, TILES, LABEL, sync_bn=False,
                                                    executions=_executions({0: [], 1: []}))
    assert rel(loss, loss0) < 1e-6
    assert_close(g_enc, g_enc0, 1e-5)
    assert_close(g_head, g_head0, 1e-5)
    assert_close(nnx.state(encoder, nnx.BatchStat), per_shard_running_stats(tiny_resnet(), shards),
                 1e-6)


def test_merged_shard_moments_are_the_moments_of_all_values():
    x = jax.random.normal(jax.random.key(0), (7, 3)) * 3 + 1
    parts = [(len(p), p.mean(0), p.var(0)) for p in (x[:2], x[2:3], x[3:])]
    mean, var = merge_shard_moments(parts)
    assert rel(mean, x.mean(0)) < 1e-6 and rel(var, x.var(0)) < 1e-6


@pytest.mark.slow
def test_synchronised_batch_norm_streams_the_stages_one_engine_runs_in_memory():
    """big_stages=0: one engine would run layer1 as its jitted tail; the lockstep engines stream it."""
    tiles = TILES[:3]
    loss0, (g_enc0, g_head0) = one_device(tiny_resnet(stages=1), head(in_dim=64), tiles)
    encoder = tiny_resnet(big=True, stages=1)
    encoder.big_stages = 0
    loss, (g_enc, g_head) = big_mesh_value_and_grad(encoder, head(in_dim=64), tiles, LABEL,
                                                    sync_bn=True,
                                                    executions=_executions({0: [], 1: []}))
    assert rel(loss, loss0) < 1e-6
    assert_close(g_enc, g_enc0, 1e-5)
    assert_close(g_head, g_head0, 1e-5)


def test_synchronised_batch_norm_over_big_shards_needs_the_fused_path():
    encoder = tiny_resnet(big=True)
    encoder.fused = False
    with pytest.raises(ValueError, match="fused=False"):
        big_mesh_value_and_grad(encoder, head(), TILES, LABEL, sync_bn=True,
                                executions=_executions({0: [], 1: []}))
