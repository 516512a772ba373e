import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.layers import Execution, big_conv2d, big_conv2d_stats
from bigjax.layers.conv import conv2d
from bigjax.layers.plan import ConvGeometry
from tests.layers.helpers import EX, grad, in_device_memory, rel_err, weighted_sum_loss

# every (kernel, stride, padding) a ResNet uses, plus a dilated one
GEOMETRIES = [(7, 2, 3, 1), (3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (1, 2, 0, 1), (3, 1, 2, 2)]
BUDGETS = ["one", "few", "dozens"]  # partitions: the whole batch, a few bands, dozens of bands


def _budget(label, k):
    """Bytes for the label; the 7x7 stride-2 kernel's smallest band needs about 30 kB."""
    return {"one": 10**8, "few": 60_000, "dozens": 31_000 if k == 7 else 20_000}[label]


def _data(k, seed=0, n=2, h=37, w=29, cin=5, cout=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, h, w, cin)).astype(np.float32)
    kernel = (rng.normal(size=(k, k, cin, cout)) / k).astype(np.float32)
    bias = rng.normal(size=(cout,)).astype(np.float32)
    return rng, *jax.device_put((x, kernel, bias), EX.compute)  # explicit: transfers are guarded


@pytest.mark.parametrize("k,s,p,d", GEOMETRIES)
@pytest.mark.parametrize("budget", BUDGETS)
def test_big_conv2d_equals_plain_conv(k, s, p, d, budget):
    budget = _budget(budget, k)
    rng, x, kernel, bias = _data(k)
    geom = ConvGeometry.make(k, s, p, d)
    plain = jax.jit(lambda x, w, b: conv2d(x, w, geom) + b)
    big = lambda x, w, b: big_conv2d(x, w, b, stride=s, padding=p, dilation=d,  # noqa: E731
                                     execution=Execution(budget))
    y = big(x, kernel, bias)
    y_ref = plain(x, kernel, bias)
    assert y.devices() == {EX.host}
    assert rel_err(y, y_ref) < 1e-6
    weights = EX.to_compute(rng.normal(size=y_ref.shape).astype(np.float32))
    grads = grad(weighted_sum_loss(big, weights), argnums=(0, 1, 2))(x, kernel, bias)
    ref = grad(weighted_sum_loss(plain, weights), argnums=(0, 1, 2))(x, kernel, bias)
    assert rel_err(grads, ref) < 1e-5
    assert grads[0].devices() == {EX.host}
    assert grads[1].devices() == {EX.compute}


@pytest.mark.parametrize("budget", [10**8, 30_000])
def test_fused_conv_prologue_and_statistics_equal_plain(budget):
    rng, x, kernel, _ = _data(3, seed=1)
    a = rng.uniform(0.5, 2.0, size=(5,)).astype(np.float32)
    b = rng.normal(size=(5,)).astype(np.float32)
    a, b = jax.device_put((a, b), EX.compute)
    geom = ConvGeometry.make(3, 2, 1)

    @jax.jit  # an eager jnp op sends its Python constants: an implicit transfer
    def plain(x, w, a, b):
        y = conv2d(jax.nn.relu(x * a + b), w, geom)
        return y, jnp.mean(y, axis=(0, 1, 2)), jnp.var(y, axis=(0, 1, 2))

    def big(x, w, a, b):
        return big_conv2d_stats(x, w, pre_scale=a, pre_shift=b, stride=2, padding=1,
                                execution=Execution(budget))

    assert rel_err(big(x, kernel, a, b), plain(x, kernel, a, b)) < 1e-5
    wy = EX.to_compute(rng.normal(size=plain(x, kernel, a, b)[0].shape).astype(np.float32))
    wm, wv = (EX.to_compute(rng.normal(size=(6,)).astype(np.float32)) for _ in range(2))

    def loss(fn):  # gradients flow through the output and through its statistics
        def f(*args):
            y, m, v = fn(*args)
            return jnp.sum(jax.device_put(y, EX.compute) * wy) + m @ wm + v @ wv
        return f

    grads = grad(loss(big), argnums=(0, 1, 2, 3))(x, kernel, a, b)
    ref = grad(loss(plain), argnums=(0, 1, 2, 3))(x, kernel, a, b)
    assert rel_err(grads, ref) < 1e-5


@pytest.mark.parametrize("engine", ["eager", "compiled"])
@pytest.mark.parametrize("stats", [False, True])
@pytest.mark.parametrize("budget", [10**8, 40_000])  # one partition; row bands
def test_an_undifferentiated_input_gets_no_gradient_and_the_kernels_is_exact(stats, budget, engine):
    """The image a model starts from: its backward computes the kernel's (and bias's) gradient
    only, and sends nothing back to the host but the output's cotangent on its way in (no
    input-gradient bands; the compiled engine's program announces no bytes back)."""
    rng, x, kernel, bias = _data(7, seed=2)
    events, announced = [], []

    def observer(event, fn, *args, **kwargs):
        events.append(event)
        if event == "band_copies":
            announced.append(args)
        return fn(*args, **kwargs)

    ex = Execution(budget, observer=observer, engine=engine)
    weights = EX.to_compute(rng.normal(size=(2, 19, 15, 6)).astype(np.float32))
    geom = ConvGeometry.make(7, 2, 3)

    def big(w, b=None):
        if stats:
            y, mean, var = big_conv2d_stats(x, w, stride=2, padding=3, execution=ex)
            return jnp.sum(jax.device_put(y, EX.compute) * weights) + jnp.sum(mean * var)
        y = big_conv2d(x, w, b, stride=2, padding=3, execution=ex)
        return jnp.sum(jax.device_put(y, EX.compute) * weights)

    @jax.jit
    def plain(w, b=None):
        y = conv2d(x, w, geom) + (0 if stats else b)
        extra = jnp.sum(jnp.mean(y, axis=(0, 1, 2)) * jnp.var(y, axis=(0, 1, 2))) if stats else 0
        return jnp.sum(y * weights) + extra

    params = (kernel,) if stats else (kernel, bias)  # the fused conv has no bias
    value, pull = jax.vjp(big, *params)
    forward = len(events)
    grads = pull(jax.device_put(np.float32(1), value.sharding))
    assert rel_err(grads, grad(plain, argnums=tuple(range(len(params))))(*params)) < 1e-5
    backward = events[forward:]
    assert backward.count("to_host") == 1 and "conv_backward" in backward
    assert [d2h for _, d2h in announced[1:]] == ([0] if engine == "compiled" else [])


def _device_bytes():
    dev = EX.compute
    return sum(a.nbytes for a in jax.live_arrays() if in_device_memory(a, dev))


@pytest.mark.parametrize("stats,dtype", [(False, jnp.float32), (True, jnp.float32),
                                         (True, jnp.bfloat16)])
def test_no_partition_puts_more_than_the_budget_on_the_device(stats, dtype):
    budget = 24_000
    rng, x, kernel, bias = _data(3, seed=2, h=41)
    seen = []

    def observer(event, fn, *args, **kwargs):
        if event in ("conv_forward", "conv_backward"):
            seen.append(_device_bytes())
        return fn(*args, **kwargs)

    x_host = jax.device_put(x, EX.host).astype(dtype)  # bfloat16: a narrow host activation
    del x, bias
    ex = Execution(budget, observer=observer)
    weights = EX.to_compute(rng.normal(size=(2, 41, 29, 6)).astype(dtype))

    def loss(x, w):  # every output used: an unused one's zero cotangent is an implicit transfer
        if not stats:
            return jnp.sum(jax.device_put(big_conv2d(x, w, padding=1, execution=ex), EX.compute)
                           * weights)
        y, mean, var = big_conv2d_stats(x, w, padding=1, execution=ex)
        return jnp.sum(jax.device_put(y, EX.compute) * weights) + jnp.sum(mean) + jnp.sum(var)

    grad(loss, argnums=(0, 1))(x_host, kernel)
    assert len(seen) > 10  # many partitions, forward and backward
    assert max(seen) <= budget + weights.nbytes  # the test's own loss weights live there too


def test_big_conv2d_under_jit_is_a_clear_type_error():
    _, x, kernel, _ = _data(3)
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(lambda x: big_conv2d(x, kernel, padding=1, execution=Execution(10**8)))(x)


def test_bad_budget_is_a_value_error():
    _, x, kernel, _ = _data(3)
    with pytest.raises(ValueError, match="max_partition_bytes"):
        big_conv2d(x, kernel, execution=Execution(0))
    with pytest.raises(ValueError, match="needs"):
        big_conv2d(x, kernel, execution=Execution(1_000))
