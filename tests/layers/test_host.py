import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.layers import host
from tests.layers.helpers import EX, grad, rel_err, weighted_sum_loss

RNG = np.random.default_rng(0)
X = RNG.normal(size=(2, 37, 29, 5)).astype(np.float32)
S = RNG.normal(size=(2, 37, 29, 5)).astype(np.float32)
A = RNG.uniform(0.5, 2, size=(5,)).astype(np.float32)
B = RNG.normal(size=(5,)).astype(np.float32)


def _pool(x, window, stride, padding):
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                 (1, stride, stride, 1), pads)


CASES = {
    "relu": (host.relu, jax.nn.relu, (X,)),
    "add": (host.add, jnp.add, (X, S)),
    "max_pool_resnet": (host.max_pool, lambda x: _pool(x, 3, 2, 1), (X,)),
    "max_pool_2x2": (lambda x, execution: host.max_pool(x, window=2, stride=2, padding=0,
                                                       execution=execution),
                     lambda x: _pool(x, 2, 2, 0), (X,)),
    "global_avg_pool": (host.global_avg_pool, lambda x: x.mean(axis=(1, 2)), (X,)),
    "affine_relu": (host.affine_relu, lambda x, a, b: jax.nn.relu(x * a + b), (X, A, B)),
    "affine_add_relu": (host.affine_add_relu, lambda x, a, b, s: jax.nn.relu(x * a + b + s),
                        (X, A, B, S)),
    "affine2_add_relu": (host.affine_add_relu,
                         lambda x, a, b, s, c, d: jax.nn.relu(x * a + b + s * c + d),
                         (X, A, B, S, B, A)),
    "affine_relu_max_pool": (host.affine_relu_max_pool,
                             lambda x, a, b: _pool(jax.nn.relu(x * a + b), 3, 2, 1), (X, A, B)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_host_op_equals_plain_op_and_stays_on_the_host(name):
    op, plain, args = CASES[name]
    op, plain = functools.partial(op, execution=EX), jax.jit(plain)  # jit: constants stay put
    args = tuple(EX.to_host(a) if a.ndim == 4 else jax.device_put(a, EX.compute) for a in args)
    on_compute = tuple(jax.device_put(a, EX.compute) for a in args)  # for the reference
    y = op(*args)
    assert y.devices() == {EX.host}
    assert rel_err(y, plain(*on_compute)) < 1e-6
    weights = EX.to_compute(RNG.normal(size=y.shape).astype(np.float32))
    argnums = tuple(range(len(args)))
    grads = grad(weighted_sum_loss(op, weights), argnums=argnums)(*args)
    ref = grad(weighted_sum_loss(plain, weights), argnums=argnums)(*on_compute)
    assert rel_err(grads, ref) < 1e-5
    for g, a in zip(grads, args):  # cotangents come back where their inputs live
        assert g.devices() == a.devices()


def test_fan_out_of_a_host_array_sums_both_cotangents():
    x = EX.to_host(X)
    dx = grad(lambda x: jnp.sum(to_compute_sum(host.add(host.relu(x, execution=EX), x,
                                                        execution=EX))))(x)
    assert rel_err(dx, (X > 0) + 1.0) < 1e-6


def to_compute_sum(y):
    return jax.device_put(y, EX.compute)


def test_host_op_under_jit_is_a_clear_type_error():
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(functools.partial(host.relu, execution=EX))(X)
