import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.layers import batchnorm as bn_module
from bigjax.layers import Execution, big_batch_norm, big_batch_norm_inference
from tests.layers.helpers import EX, in_device_memory, rel_err, weighted_sum_loss


def _plain_bn(x, scale, bias, eps=1e-5):
    mean, var = jnp.mean(x, axis=(0, 1, 2)), jnp.var(x, axis=(0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var


def _data(seed=0, loc=0.0, spread=1.0):
    rng = np.random.default_rng(seed)
    x = (loc + spread * rng.normal(size=(2, 37, 29, 5))).astype(np.float32)
    scale = rng.uniform(0.5, 2, size=(5,)).astype(np.float32)
    bias = rng.normal(size=(5,)).astype(np.float32)
    return rng, x, scale, bias


@pytest.mark.parametrize("budget", [10**8, 20_000, 2_000])
def test_statistics_with_a_large_mean_equal_jnp_mean_and_var(budget):
    _, x, scale, bias = _data(loc=1000.0, spread=0.5)
    _, mean, var = big_batch_norm(x, scale, bias, execution=Execution(budget))
    x64 = x.astype(np.float64)
    assert rel_err(mean, jnp.mean(x, axis=(0, 1, 2))) < 1e-6
    assert rel_err(var, jnp.var(x, axis=(0, 1, 2))) < 1e-5
    assert rel_err(var, x64.var(axis=(0, 1, 2))) < 1e-5  # and the exact float64 value


@pytest.mark.parametrize("budget", [10**8, 20_000, 2_000])
def test_big_batch_norm_forward_and_gradients_equal_plain(budget):
    rng, x, scale, bias = _data(seed=1, loc=3.0, spread=2.0)
    big = lambda x, s, b: big_batch_norm(x, s, b, execution=Execution(budget))  # noqa: E731
    y, mean, var = big(x, scale, bias)
    assert y.devices() == {EX.host}
    assert rel_err((y, mean, var), _plain_bn(x, scale, bias)) < 1e-5
    weights = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    grads = jax.grad(weighted_sum_loss(big, weights), argnums=(0, 1, 2))(x, scale, bias)
    ref = jax.grad(weighted_sum_loss(_plain_bn, weights), argnums=(0, 1, 2))(x, scale, bias)
    assert rel_err(grads, ref) < 1e-4


def test_gradient_through_the_returned_statistics():
    rng, x, scale, bias = _data(seed=2)
    w = jnp.asarray(rng.normal(size=(5,)).astype(np.float32))
    loss = lambda fn: lambda x: fn(x)[1] @ w + fn(x)[2] @ w  # noqa: E731
    big = lambda x: big_batch_norm(x, scale, bias, execution=Execution(5_000))  # noqa: E731
    plain = lambda x: _plain_bn(x, scale, bias)  # noqa: E731
    assert rel_err(jax.grad(loss(big))(x), jax.grad(loss(plain))(x)) < 1e-5


def test_inference_form_uses_running_statistics():
    rng, x, scale, bias = _data(seed=3)
    mean = rng.normal(size=(5,)).astype(np.float32)
    var = rng.uniform(0.5, 2, size=(5,)).astype(np.float32)
    y = big_batch_norm_inference(x, scale, bias, mean, var, execution=Execution(7_000))
    assert rel_err(y, (x - mean) / np.sqrt(var + 1e-5) * scale + bias) < 1e-5


def test_under_jit_is_a_clear_type_error():
    _, x, scale, bias = _data()
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(lambda x: big_batch_norm(x, scale, bias, execution=Execution(10**8))[0])(x)


def test_no_partition_puts_more_than_the_budget_on_the_device(monkeypatch):
    budget = 6_000
    rng, x, scale, bias = _data(seed=4)
    scale, bias = (jax.device_put(v, EX.compute) for v in (scale, bias))
    seen = []
    for name in ("_affine_kernel", "_affine_pull", "_moments_pull"):
        original = getattr(bn_module, name)

        def watched(*args, _original=original, **kwargs):
            dev = EX.compute
            seen.append(sum(a.nbytes for a in jax.live_arrays() if in_device_memory(a, dev)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(bn_module, name, watched)
    weights = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    x = jax.device_put(x, EX.host)
    big = lambda x, s, b: big_batch_norm(x, s, b, execution=Execution(budget))  # noqa: E731
    jax.grad(weighted_sum_loss(big, weights), argnums=(0, 1, 2))(x, scale, bias)
    assert len(seen) > 30  # dozens of partitions in the normalise pass and both backward passes
    assert max(seen) <= budget + weights.nbytes  # the test's own loss weights live there too
