import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.layers import host
from bigjax.layers.spill import SpillStats
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


def test_a_fork_gives_its_input_twice_and_its_cotangent_is_the_sum_jax_would_make():
    """``host.fork``: both outputs are the input itself (no copy); the input's cotangent is the sum of
    the two branches' bit for bit as JAX adds a fan-out, on the host where the input lives."""
    w = RNG.normal(size=X.shape).astype(np.float32)
    x, on_host = EX.to_host(X), EX.to_host(w)

    def loss(x, split):
        a, b = split(x)
        return jnp.sum(to_compute_sum(host.add(host.relu(a, execution=EX), b * on_host,
                                               execution=EX)))
    a, b = host.fork(x, execution=EX)
    assert a is x and b is x
    dx = grad(loss)(x, functools.partial(host.fork, execution=EX))
    assert dx.devices() == {EX.host}
    assert np.array_equal(dx, grad(loss)(x, lambda x: (x, x)))
    assert rel_err(dx, (X > 0) + w) < 1e-6


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


POOLS = {"resnet": (3, 2, 1), "2x2": (2, 2, 0), "wide": (5, 3, 2)}


@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize("spilled", [False, True])
def test_a_pooling_backward_runs_in_row_bands_with_the_rows_its_windows_read(pool, spilled,
                                                                            tmp_path):
    """A budget of a few rows: the folded-BatchNorm-ReLU-max-pool pullback runs band by band, each
    band reading the rows its windows reach (cut from RAM, or spill reads none of which spans the
    residual), and its input cotangent is the whole-array pullback's bit for bit (every window
    reaching a row lies in the row's band); a, b summed over the bands, to round-off. 37 rows: the
    2x2 pool reads no window of the last row, whose cotangent is zero."""
    window, stride, padding = POOLS[pool]
    events = []

    def observer(event, fn, *args, **kwargs):
        if event in ("host_backward", "spill_read"):
            events.append((event, args[0] if event == "spill_read" else None))
        return fn(*args, **kwargs)
    ex = EX.replace(max_partition_bytes=host.POOL_PULL * 8 * 29 * 5 * 4, observer=observer)
    if spilled:
        ex = ex.replace(host_memory=0, spill_dir=tmp_path)
    x = jax.device_put(X, ex.host)
    a, b = (jax.device_put(v, ex.compute) for v in (A, B))

    def plain(x, a, b):
        return _pool(jax.nn.relu(x * a + b), window, stride, padding)
    shape = jax.eval_shape(plain, X, A, B).shape
    weights = jax.device_put(RNG.normal(size=shape).astype(np.float32), ex.host)

    def big(x, a, b):
        return jnp.sum(host.affine_relu_max_pool(x, a, b, window=window, stride=stride,
                                                 padding=padding, execution=ex) * weights)
    got = grad(big, (0, 1, 2))(x, a, b)
    want = grad(jax.jit(lambda x, a, b: jnp.sum(plain(x, a, b) * weights)), (0, 1, 2))(
        *(jax.device_put(v, ex.host) for v in (X, A, B)))
    assert sum(e == "host_backward" for e, _ in events) >= 4
    assert np.array_equal(jax.device_get(got[0]), jax.device_get(want[0]))
    assert rel_err(got[1:], want[1:]) < 1e-5
    assert got[0].devices() == {ex.host} and got[1].devices() == {ex.compute}
    if pool == "2x2":
        assert not np.any(jax.device_get(got[0])[:, -1]) and np.any(jax.device_get(got[0])[:, -2])
    reads = [n for e, n in events if e == "spill_read"]
    assert (len(reads) >= 4 and max(reads) < X.nbytes // 2) if spilled else not reads


@pytest.mark.parametrize("h", [1, 2, 7, 37])
@pytest.mark.parametrize("pool", sorted(POOLS))
def test_a_row_band_reads_exactly_the_rows_of_the_windows_that_reach_it(h, pool):
    """``Pool.band`` against brute force: the output rows whose window (padding included) meets
    the band, the input rows they read, and the padding rows that make up the rest."""
    window, stride, padding = POOLS[pool]
    rows = host.Pool(window, stride, padding)
    for r0 in range(h):
        for r1 in range(r0 + 1, h + 1):
            reach = [o for o in range(rows.outputs(h))
                     if o * stride - padding < r1 and o * stride - padding + window > r0]
            (o0, o1), (z0, z1), (top, bottom) = rows.band(r0, r1, h)
            if not reach:
                assert o0 >= o1
                continue
            assert (o0, o1) == (reach[0], reach[-1] + 1)
            first, last = o0 * stride - padding, (o1 - 1) * stride - padding + window
            assert (z0, z1, top, bottom) == (max(0, first), min(h, last), max(0, -first),
                                             max(0, last - h))


def test_the_global_average_pool_keeps_nothing_of_its_input(tmp_path):
    """Its pullback is its transpose, which needs only the input's shape: with every residual to be
    spilled it writes nothing to the store, and its gradient is the mean's."""
    stats = SpillStats()
    ex = EX.replace(host_memory=0, spill_dir=tmp_path, observer=stats)
    weights = ex.to_compute(RNG.normal(size=(2, 5)).astype(np.float32))
    got = grad(weighted_sum_loss(functools.partial(host.global_avg_pool, execution=ex), weights))(
        ex.to_host(X))
    want = grad(weighted_sum_loss(jax.jit(lambda x: x.mean(axis=(1, 2))), weights))(
        jax.device_put(X, ex.compute))
    assert stats.writes == 0 and stats.reads == 0
    assert rel_err(got, want) < 1e-6 and got.devices() == {ex.host}
