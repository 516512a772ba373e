"""The traffic counter counts what crosses between host memory and the compute device, each way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.bench.traffic import Traffic, step_traffic
from bigjax.layers import Execution, big_batch_norm, big_conv2d, big_conv2d_stats
from bigjax.layers.conv import _footprint
from bigjax.layers.plan import ConvGeometry, plan_partitions
from bigjax.models.resnet import BigResNet

EX = Execution()


def _conv_step(budget, counter):
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(size=(2, 37, 29, 5)).astype(np.float32), EX.host)
    kernel = jax.device_put(rng.normal(size=(3, 3, 5, 6)).astype(np.float32), EX.compute)
    ex = counter.observe(Execution(budget))
    y, pull = jax.vjp(lambda x, w: big_conv2d(x, w, padding=1, execution=ex), x, kernel)
    fwd = dict(counter.bytes)
    pull(jax.device_put(np.ones(y.shape, np.float32), EX.compute))  # cotangent from the device
    return x, kernel, y, fwd, dict(counter.bytes)


def _input_band_bytes(x, kernel, budget, backward):
    geom = ConvGeometry.make(3, 1, 1)
    fp = _footprint(kernel, None, False, backward)
    plan = plan_partitions(x.shape, 6, geom, fp, budget, 4)
    return sum((p.n1 - p.n0) * (p.i1 - p.i0) * x.shape[2] * x.shape[3] * 4 for p in plan), len(plan)


def test_one_partition_moves_each_array_once_each_way():
    x, _, y, fwd, total = _conv_step(10**8, Traffic(EX))
    assert fwd == {"to_compute": x.nbytes, "to_host": y.nbytes}  # the kernel is already there
    # backward: the cotangent comes to the host, then it and x go down; dx comes back up
    assert total["to_compute"] - fwd["to_compute"] == y.nbytes + x.nbytes
    assert total["to_host"] - fwd["to_host"] == y.nbytes + x.nbytes


def test_row_bands_move_their_halos_too():
    budget = 12_000
    x, kernel, y, fwd, total = _conv_step(budget, Traffic(EX))
    down_fwd, parts = _input_band_bytes(x, kernel, budget, backward=False)
    down_bwd, _ = _input_band_bytes(x, kernel, budget, backward=True)
    assert parts > 10 and down_fwd > x.nbytes  # halo rows travel with each band
    assert fwd == {"to_compute": down_fwd, "to_host": y.nbytes}
    assert total["to_compute"] - fwd["to_compute"] == y.nbytes + down_bwd
    assert total["to_host"] - fwd["to_host"] == y.nbytes + x.nbytes  # dx bands are disjoint


def test_a_streamed_step_issues_no_blocking_read():
    rng = np.random.default_rng(2)
    x = jax.device_put(rng.normal(size=(2, 23, 19, 3)).astype(np.float32), EX.host)
    w = jax.device_put(rng.normal(size=(3, 3, 3, 4)).astype(np.float32), EX.compute)
    scale = jax.device_put(np.ones(4, np.float32), EX.compute)

    def loss(w, e):  # conv with statistics, then a two-pass BatchNorm: every kind of band loop
        y, mean, var = big_conv2d_stats(x, w, padding=1, execution=e)
        z, *_ = big_batch_norm(y, scale, mean, execution=e)  # bias = mean: any (4,) vector
        return jnp.sum(jax.device_put(z, EX.compute)) + jnp.sum(var)

    t = step_traffic(lambda e: loss(w, e), lambda e: jax.grad(loss)(w, e),
                     Execution(6_000, prefetch=1))
    assert t["host_reads"] == 0 and t["waits"] > 10  # many partitions, none read back by the host


@pytest.mark.slow
def test_a_big_resnet_step_moves_bytes_both_ways_without_blocking_reads():
    x = np.random.default_rng(1).normal(size=(2, 61, 45, 3)).astype(np.float32)
    model = BigResNet(18, big_stages=2, rngs=nnx.Rngs(0))
    ex = Execution(1_400_000, prefetch=None)
    weights = jnp.ones((2, model.embed_dim))

    def step(e):
        return nnx.value_and_grad(lambda m: jnp.sum(m(x, train=True, execution=e) * weights))(model)

    t = step_traffic(lambda e: model(x, train=True, execution=e), step, ex)
    assert t["fwd_h2d"] >= x.nbytes and t["fwd_d2h"] > 0
    assert t["bwd_h2d"] > t["fwd_h2d"] and t["bwd_d2h"] > 0  # x, y and the cotangent go down
    assert t["host_reads"] == 0 and t["waits"] == 0  # CPU, no prefetch window: nothing blocks


def test_single_device_engine_moves_nothing():
    dev = jax.devices()[0]
    counter = Traffic(Execution(10**8, compute=dev, host=dev))
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(size=(1, 9, 7, 2)).astype(np.float32), dev)
    big_conv2d(x, jax.device_put(np.ones((3, 3, 2, 2), np.float32), dev),
               execution=counter.observe(counter.execution))
    assert counter.bytes == {"to_compute": 0, "to_host": 0} and counter.calls["conv_forward"] == 1


def test_stopwatch_counts_a_nested_event_once():
    import time

    from bigjax.bench.profile import CATEGORIES, Stopwatch

    watch = Stopwatch()
    start = time.perf_counter()
    watch("to_host", lambda: watch("host_read", time.sleep, 0.05))  # as a staged to_host does
    wall = time.perf_counter() - start
    assert watch.totals[CATEGORIES["host_read"]] >= 0.05
    assert watch.totals[CATEGORIES["to_host"]] < 0.05
    assert sum(watch.totals.values()) <= wall
