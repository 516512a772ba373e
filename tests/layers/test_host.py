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


@pytest.mark.parametrize("spilled", [False, True])
def test_a_row_wise_backward_runs_in_row_bands(spilled, tmp_path):
    """A budget of a few rows: the affine-add-ReLU pullback runs band by band, no band (nor spill
    read) spans the whole residual, and its cotangents are the whole-array pullback's (the 4-D ones
    bit for bit: the same elementwise ops; a, b summed over the bands, so to float32 round-off)."""
    events = []

    def observer(event, fn, *args, **kwargs):
        if event in ("host_backward", "spill_read"):
            events.append((event, args[0] if event == "spill_read" else None))
        return fn(*args, **kwargs)
    ex = EX.replace(max_partition_bytes=6 * 29 * 5 * 4 * 4, observer=observer)  # ~6 rows of each
    if spilled:
        ex = ex.replace(host_memory=0, spill_dir=tmp_path)
    x, s = (jax.device_put(v, ex.host) for v in (X, S))
    a, b = (jax.device_put(v, ex.compute) for v in (A, B))
    weights = jax.device_put(RNG.normal(size=X.shape).astype(np.float32), ex.host)

    def big(x, a, b, s):
        return jnp.sum(host.affine_add_relu(x, a, b, s, execution=ex) * weights)

    def plain(x, a, b, s):
        return jnp.sum(jax.nn.relu(x * a + b + s) * weights)
    got = grad(big, (0, 1, 2, 3))(x, a, b, s)
    want = grad(jax.jit(plain), (0, 1, 2, 3))(*(jax.device_put(v, ex.host) for v in (X, A, B, S)))
    assert sum(e == "host_backward" for e, _ in events) >= 6
    for i in (0, 3):
        assert np.array_equal(jax.device_get(got[i]), jax.device_get(want[i]))
    assert rel_err(got[1:3], want[1:3]) < 1e-5
    assert {d.platform for g in got for d in g.devices()} == {"cpu"}
    assert got[1].devices() == {ex.compute} and got[0].devices() == {ex.host}
    reads = [n for e, n in events if e == "spill_read"]
    assert (len(reads) >= 12 and max(reads) < X.nbytes // 2) if spilled else not reads


def test_max_pool_pullback_groups_grow_until_their_temporaries_fit_the_budget():
    x = EX.to_host(X)
    assert host._groups(8, (x,), 2**30) == 8  # the least, whatever the budget
    assert host._groups(8, (x,), X.nbytes // 4) == 4 * host.POOL_PULL  # (5 channels: one a group)
    tiny = EX.replace(max_partition_bytes=X.nbytes // 4)
    weights = EX.to_compute(RNG.normal(size=(2, 19, 15, 5)).astype(np.float32))
    got = grad(weighted_sum_loss(functools.partial(host.max_pool, execution=tiny), weights))(x)
    plain = jax.jit(lambda x: _pool(x, 3, 2, 1))
    want = grad(weighted_sum_loss(plain, weights))(jax.device_put(X, EX.compute))
    assert rel_err(got, want) < 1e-6 and got.devices() == {EX.host}
