"""Bounded asynchronous streaming: what a partitioned step leaves on the compute device.

``jax.live_arrays()`` lists every JAX array object, and several objects may share one device buffer (a
``device_put`` of an array already on its device is such an alias): counting objects, a Big ResNet-18
step seemed to hold 2.4-2.7 budgets beyond its parameters and gradients; counting buffers, it holds
under one. The documented bound, checked here on a chain of partitioned ops with dozens of partitions:
at every event, distinct compute-device buffers <= weights + their gradients + the test's loss weights
+ one budget — whatever the prefetch depth, because an in-flight partition's buffers belong to arrays
Python has already dropped. Those are bounded by the window instead: at most ``prefetch`` older
partitions are still unfinished when a kernel runs.
"""

import jax
import numpy as np
import pytest

from bigjax.bench.memory import device_buffer_bytes
from bigjax.layers import Execution, big_conv2d, big_conv2d_stats, host
from tests.layers.helpers import EX, device_bytes_already_live, grad, rel_err, weighted_sum_loss

BUDGET = 24_000


@jax.jit  # eager ops would send their Python constants: an implicit transfer
def _fold(mean, var):
    a = jax.lax.rsqrt(var + 1e-5)
    return a, -mean * a


def _chain(ex):
    """conv + statistics, folded BatchNorm + ReLU on the host, conv: a small streamed network."""
    def f(x, w1, w2):
        y, mean, var = big_conv2d_stats(x, w1, padding=1, execution=ex)
        h = host.affine_relu(y, *_fold(mean, var), execution=ex)
        return big_conv2d(h, w2, padding=1, execution=ex)
    return f


def _data():
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(size=(2, 41, 29, 5)).astype(np.float32), EX.host)
    w1 = rng.normal(size=(3, 3, 5, 6)).astype(np.float32) / 3
    w2 = rng.normal(size=(3, 3, 6, 4)).astype(np.float32) / 3
    weights = rng.normal(size=(2, 41, 29, 4)).astype(np.float32)
    return x, *jax.device_put((w1, w2, weights), EX.compute)


@pytest.mark.parametrize("prefetch", [0, 1, None])
def test_device_buffers_stay_within_one_budget_beyond_weights(prefetch):
    before = device_bytes_already_live()
    x, w1, w2, weights = _data()
    seen, in_flight = [], []
    ex = Execution(BUDGET, prefetch=prefetch)

    def observer(event, fn, *args, **kwargs):
        seen.append(device_buffer_bytes(EX.compute))
        if event in ("conv_forward", "conv_backward", "batch_norm", "host_forward"):
            in_flight.append(ex.window.in_flight())
        return fn(*args, **kwargs)

    ex = ex.replace(observer=observer)
    dx, dw1, dw2 = grad(weighted_sum_loss(_chain(ex), weights), argnums=(0, 1, 2))(x, w1, w2)
    assert len(in_flight) > 20  # dozens of partitions, forward and backward
    fixed = 2 * (w1.nbytes + w2.nbytes) + weights.nbytes  # weights, their gradients, loss weights
    assert max(seen) - before <= fixed + BUDGET
    if prefetch is not None:
        assert max(in_flight) <= prefetch


def test_prefetch_depth_does_not_change_results():
    x, w1, w2, weights = _data()
    out = {}
    for prefetch in (None, 0, 2):
        loss = weighted_sum_loss(_chain(Execution(BUDGET, prefetch=prefetch)), weights)
        out[prefetch] = grad(loss, argnums=(0, 1, 2))(x, w1, w2)
    for prefetch in (0, 2):
        assert rel_err(out[prefetch], out[None]) == 0.0  # same kernels, same order: bit-identical


def test_bad_prefetch_is_a_value_error():
    with pytest.raises(ValueError, match="prefetch"):
        Execution(BUDGET, prefetch=-1)


def test_staged_copies_are_read_after_the_band_loop_and_change_nothing():
    """The accelerator's code path on a CPU: device->host copies through ``pinned_host`` memory,
    adopted by the host only when the op joins its bands (never inside the band loop)."""
    x, w1, w2, weights = _data()
    events = []

    def observer(event, fn, *args, **kwargs):
        events.append(event)
        return fn(*args, **kwargs)

    plain = Execution(BUDGET, prefetch=1)
    staged = Execution(BUDGET, prefetch=1, pinned_staging=True, observer=observer)
    y = big_conv2d(x, w1, padding=1, execution=staged)
    kernels = events.count("conv_forward")
    assert kernels > 5 and events.count("host_read") == kernels
    assert events.index("host_read") > len(events) - 1 - events[::-1].index("conv_forward")
    assert rel_err(y, big_conv2d(x, w1, padding=1, execution=plain)) == 0.0
    loss = lambda ex: weighted_sum_loss(_chain(ex), weights)  # noqa: E731
    grads = grad(loss(staged), argnums=(0, 1, 2))(x, w1, w2)
    assert rel_err(grads, grad(loss(plain), argnums=(0, 1, 2))(x, w1, w2)) == 0.0
