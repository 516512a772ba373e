import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.layers import Execution, big_batch_norm, big_batch_norm_inference
from tests.layers.helpers import EX, grad, in_device_memory, rel_err, weighted_sum_loss


@jax.jit  # jitted references: an eager jnp op sends its Python constants, an implicit transfer
def _plain_bn(x, scale, bias, eps=1e-5):
    mean, var = jnp.mean(x, axis=(0, 1, 2)), jnp.var(x, axis=(0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var


def _data(seed=0, loc=0.0, spread=1.0):
    rng = np.random.default_rng(seed)
    x = (loc + spread * rng.normal(size=(2, 37, 29, 5))).astype(np.float32)
    scale = rng.uniform(0.5, 2, size=(5,)).astype(np.float32)
    bias = rng.normal(size=(5,)).astype(np.float32)
    return rng, *jax.device_put((x, scale, bias), EX.compute)  # explicit: transfers are guarded


@pytest.mark.parametrize("budget", [10**8, 20_000, 2_000])
def test_statistics_with_a_large_mean_equal_jnp_mean_and_var(budget):
    _, x, scale, bias = _data(loc=1000.0, spread=0.5)
    _, mean, var = big_batch_norm(x, scale, bias, execution=Execution(budget))
    x64 = np.asarray(jax.device_get(x), np.float64)
    assert rel_err(mean, jax.jit(jnp.mean, static_argnums=1)(x, (0, 1, 2))) < 1e-6
    assert rel_err(var, jax.jit(jnp.var, static_argnums=1)(x, (0, 1, 2))) < 1e-5
    assert rel_err(var, x64.var(axis=(0, 1, 2))) < 1e-5  # and the exact float64 value


@pytest.mark.parametrize("budget", [10**8, 20_000, 2_000])
def test_big_batch_norm_forward_and_gradients_equal_plain(budget):
    rng, x, scale, bias = _data(seed=1, loc=3.0, spread=2.0)
    big = lambda x, s, b: big_batch_norm(x, s, b, execution=Execution(budget))  # noqa: E731
    y, mean, var = big(x, scale, bias)
    assert y.devices() == {EX.host}
    assert rel_err((y, mean, var), _plain_bn(x, scale, bias)) < 1e-5
    weights = EX.to_compute(rng.normal(size=x.shape).astype(np.float32))
    grads = grad(weighted_sum_loss(big, weights), argnums=(0, 1, 2))(x, scale, bias)
    ref = grad(weighted_sum_loss(_plain_bn, weights), argnums=(0, 1, 2))(x, scale, bias)
    assert rel_err(grads, ref) < 1e-4


def test_gradient_through_the_returned_statistics():
    rng, x, scale, bias = _data(seed=2)
    w = EX.to_compute(rng.normal(size=(5,)).astype(np.float32))
    loss = lambda fn: lambda x: fn(x)[1] @ w + fn(x)[2] @ w  # noqa: E731
    big = lambda x: big_batch_norm(x, scale, bias, execution=Execution(5_000))  # noqa: E731
    plain = lambda x: _plain_bn(x, scale, bias)  # noqa: E731
    # y is unused: JAX's autodiff makes its zero cotangent from a Python scalar (not the ops' doing)
    with jax.transfer_guard_host_to_device("allow"):
        assert rel_err(grad(loss(big))(x), grad(loss(plain))(x)) < 1e-5


def test_inference_form_uses_running_statistics():
    rng, x, scale, bias = _data(seed=3)
    mean = rng.normal(size=(5,)).astype(np.float32)
    var = rng.uniform(0.5, 2, size=(5,)).astype(np.float32)
    mean, var = jax.device_put((mean, var), EX.compute)
    y = big_batch_norm_inference(x, scale, bias, mean, var, execution=Execution(7_000))
    plain = jax.jit(lambda x, m, v, s, b: (x - m) / jnp.sqrt(v + 1e-5) * s + b)
    assert rel_err(y, plain(x, mean, var, scale, bias)) < 1e-5


def test_under_jit_is_a_clear_type_error():
    _, x, scale, bias = _data()
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(lambda x: big_batch_norm(x, scale, bias, execution=Execution(10**8))[0])(x)


def test_no_partition_puts_more_than_the_budget_on_the_device():
    budget = 6_000
    rng, x, scale, bias = _data(seed=4)
    seen = []

    def observer(event, fn, *args, **kwargs):
        if event == "batch_norm":
            seen.append(sum(a.nbytes for a in jax.live_arrays() if in_device_memory(a, EX.compute)))
        return fn(*args, **kwargs)

    weights = EX.to_compute(rng.normal(size=x.shape).astype(np.float32))
    x = jax.device_put(x, EX.host)
    ex = Execution(budget, observer=observer)
    big = lambda x, s, b: big_batch_norm(x, s, b, execution=ex)  # noqa: E731
    grad(weighted_sum_loss(big, weights), argnums=(0, 1, 2))(x, scale, bias)
    assert len(seen) > 30  # dozens of partitions in both passes and both backward passes
    assert max(seen) <= budget + weights.nbytes  # the test's own loss weights live there too
