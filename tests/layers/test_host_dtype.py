"""Narrow host activations (``Execution.host_dtype``): stored rounded, computed wide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.layers import Execution, big_conv2d_stats
from bigjax.layers.conv import conv2d
from bigjax.layers.plan import ConvGeometry
from tests.layers.helpers import EX, grad, rel_err

BF16_EPS = 2.0**-8  # bfloat16's relative rounding error bound (8 significand bits)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 23, 19, 5)).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, 5, 6)) / 3).astype(np.float32)
    a = rng.uniform(0.5, 2.0, size=(5,)).astype(np.float32)
    b = rng.normal(size=(5,)).astype(np.float32)
    x = jax.device_put(x, EX.host).astype(jnp.bfloat16)  # a bfloat16 host activation
    return rng, x, *jax.device_put((kernel, a, b), EX.compute)


def _plain(x, w, a, b):
    """The independent computation: everything in float32 on the bfloat16 input's values."""
    y = conv2d(jax.nn.relu(x.astype(jnp.float32) * a + b), w, ConvGeometry.make(3, 2, 1))
    return y, jnp.mean(y, axis=(0, 1, 2)), jnp.var(y, axis=(0, 1, 2))


def _big(x, w, a, b):
    return big_conv2d_stats(x, w, pre_scale=a, pre_shift=b, stride=2, padding=1,
                            execution=Execution(12_000))  # a dozen row bands


def test_a_bfloat16_band_is_convolved_in_float32_and_rounded_once():
    _, x, kernel, a, b = _data()
    y, mean, var = _big(x, kernel, a, b)
    y_ref, mean_ref, var_ref = jax.jit(_plain)(jax.device_put(x, EX.compute), kernel, a, b)
    assert y.dtype == jnp.bfloat16 and y.devices() == {EX.host}
    assert rel_err(y, y_ref) <= BF16_EPS
    assert rel_err(y, y_ref) > 0  # it was rounded
    # the statistics come from the unrounded float32 bands
    assert mean.dtype == jnp.float32 and rel_err((mean, var), (mean_ref, var_ref)) < 1e-5


def test_gradients_of_a_bfloat16_activation_are_bfloat16_and_parameters_float32():
    rng, x, kernel, a, b = _data(1)
    y_ref = jax.jit(_plain)(jax.device_put(x, EX.compute), kernel, a, b)[0]
    wy = EX.to_compute(rng.normal(size=y_ref.shape).astype(np.float32))
    wm, wv = (EX.to_compute(rng.normal(size=(6,)).astype(np.float32)) for _ in range(2))

    def loss(fn):
        def f(x, w, a, b):
            y, m, v = fn(x, w, a, b)
            return jnp.sum(jax.device_put(y, EX.compute).astype(jnp.float32) * wy) + m @ wm + v @ wv
        return f

    dx, dw, da, db = grad(loss(_big), argnums=(0, 1, 2, 3))(x, kernel, a, b)
    ref = grad(loss(jax.jit(_plain)), argnums=(0, 1, 2, 3))(jax.device_put(x, EX.compute), kernel, a, b)
    assert dx.dtype == jnp.bfloat16 and dx.devices() == {EX.host}
    assert {v.dtype for v in (dw, da, db)} == {jnp.dtype(jnp.float32)}
    assert rel_err(dx, ref[0]) <= 2 * BF16_EPS  # its cotangent and itself rounded
    # y's cotangent is rounded to bfloat16 on its way back, as the host keeps it
    assert rel_err((dw, da, db), ref[1:]) < 4 * BF16_EPS


def test_host_dtype_is_validated_and_casts_where_the_value_lives():
    with pytest.raises(ValueError, match="floating"):
        Execution(host_dtype=jnp.int8)
    ex = Execution(host_dtype="bfloat16")
    x = jax.device_put(np.ones((2, 3), np.float32), ex.compute)
    stored = ex.stored(x)
    assert stored.dtype == jnp.bfloat16 and stored.devices() == {ex.compute}
    assert Execution().stored(x) is x
