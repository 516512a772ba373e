"""The compiled engine (one XLA program per conv pass) against the eager one, which the other layer
tests check against plain convolutions: same values and gradients, same bytes, bounded device memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.bench.traffic import Traffic
from bigjax.layers import Execution
from bigjax.layers import compiled
from bigjax.layers.conv import big_conv2d, big_conv2d_stats
from tests.layers.helpers import EX, grad, rel_err

RNG = np.random.default_rng(0)


def _inputs(n, h, w, cin, cout, k):
    x = RNG.normal(size=(n, h, w, cin)).astype(np.float32)
    kernel = RNG.normal(size=(k, k, cin, cout)).astype(np.float32) * 0.2
    a, b = RNG.normal(size=(2, cin)).astype(np.float32)
    return x, *(jax.device_put(v, EX.compute) for v in (kernel, a, b))


@jax.jit
def _score(y, mean=None, var=None):
    """Jitted, so its constants are not implicit transfers (the layer tests guard them)."""
    value = jnp.sum(y.astype(jnp.float32) ** 2) * 1e-3
    return value if mean is None else value + jnp.sum(mean * 3) + jnp.sum(var)


def _loss(ex, stats, geom):
    """A loss reading the output and (with ``stats``) its moments, so every cotangent is non-zero."""
    def loss(x, kernel, a, b):
        if stats:
            y, mean, var = big_conv2d_stats(x, kernel, pre_scale=a, pre_shift=b, execution=ex, **geom)
            return _score(jax.device_put(y, ex.compute), mean, var)
        return _score(jax.device_put(big_conv2d(x, kernel, execution=ex, **geom), ex.compute))
    return loss


def _value_and_grads(ex, x, kernel, a, b, stats, geom):
    loss = _loss(ex, stats, geom)
    xh = ex.stored(jax.device_put(x, ex.host))
    argnums = (0, 1, 2, 3) if stats else (0, 1)  # a plain conv has no prologue
    return loss(xh, kernel, a, b), grad(loss, argnums=argnums)(xh, kernel, a, b)


# (images, rows, cols, cin, cout, kernel, geometry, budget, stats): budgets force row bands with
# halos (first, middle and last bands per image), image chunks with a smaller last chunk, a 1x1
# stride-2 conv whose bands skip input rows, the 7x7/2 stem, dilation
CASES = [
    (2, 37, 23, 5, 7, 3, dict(stride=1, padding=1), 20_000, True),
    (3, 37, 23, 5, 7, 3, dict(stride=2, padding=1), 15_000, True),
    (2, 41, 19, 3, 6, 7, dict(stride=2, padding=3), 30_000, True),
    (2, 16, 15, 4, 6, 1, dict(stride=2, padding=0), 4_000, False),
    (5, 9, 7, 3, 4, 3, dict(stride=1, padding=1), 8_000, True),
    pytest.param(2, 37, 23, 5, 7, 3, dict(stride=1, padding=1, dilation=2), 40_000, True,
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("n,h,w,cin,cout,k,geom,budget,stats", CASES)
def test_compiled_conv_equals_the_eager_engine(n, h, w, cin, cout, k, geom, budget, stats):
    x, kernel, a, b = _inputs(n, h, w, cin, cout, k)
    eager = Execution(budget)
    expected = _value_and_grads(eager, x, kernel, a, b, stats, geom)
    got = _value_and_grads(eager.replace(engine="compiled"), x, kernel, a, b, stats, geom)
    assert rel_err(got, expected) < 1e-6


@pytest.mark.parametrize("changes", [dict(pinned_staging=True), dict(host_dtype=jnp.bfloat16)])
def test_compiled_conv_with_staging_or_narrow_activations_equals_eager(changes):
    """``pinned_staging``: host buffers in the compute device's pinned_host memory, the code path of
    an accelerator; bfloat16 host activations widened on the device in both engines."""
    x, kernel, a, b = _inputs(2, 37, 23, 5, 7, 3)
    geom = dict(stride=1, padding=1)
    eager = Execution(20_000, **changes)
    expected = _value_and_grads(eager, x, kernel, a, b, True, geom)
    got = _value_and_grads(eager.replace(engine="compiled"), x, kernel, a, b, True, geom)
    assert rel_err(got, expected) < 1e-6


def test_staged_program_reads_host_buffers_and_writes_its_output_there():
    ex = Execution(20_000, pinned_staging=True, engine="compiled")
    x, kernel, *_ = _inputs(1, 37, 23, 5, 7, 3)
    seen = []

    def observer(event, fn, *args, **kwargs):
        if event == "conv_forward":
            seen.append(args[0].sharding.memory_kind)
            out = fn(*args, **kwargs)
            seen.append(out[0].sharding.memory_kind)
            return out
        return fn(*args, **kwargs)

    y = big_conv2d(jax.device_put(x, ex.host), kernel, padding=1, execution=ex.replace(
        observer=observer))
    assert seen == ["pinned_host", "pinned_host"]
    assert y.devices() == {ex.host}


def test_compiled_conv_moves_the_bytes_the_eager_engine_moves():
    x, kernel, a, b = _inputs(2, 37, 23, 5, 7, 3)
    geom = dict(stride=1, padding=1)
    moved = {}
    for engine in ("eager", "compiled"):
        ex = Execution(20_000, engine=engine)
        traffic = Traffic(ex)
        _value_and_grads(traffic.observe(ex), x, kernel, a, b, True, geom)
        moved[engine] = dict(traffic.bytes)
    assert moved["compiled"] == moved["eager"]
    assert moved["eager"]["to_compute"] > 3 * x.nbytes  # x, y and g bands, halos included


@pytest.mark.parametrize("prefetch", [0, pytest.param(None, marks=pytest.mark.slow)])
def test_double_buffering_off_or_unbounded_gives_the_eager_result(prefetch):
    """Prefetch 0: one partition at a time; None (unbounded) double-buffers as the default 1, which
    the tests above run: each loop loads the next partition and stores the previous one beside the
    current kernel. Row bands and image chunks."""
    for n, h, w, budget in ((2, 37, 23, 20_000), (5, 9, 7, 8_000)):
        x, kernel, a, b = _inputs(n, h, w, 5, 7, 3)
        eager = Execution(budget)
        expected = _value_and_grads(eager, x, kernel, a, b, True, dict(padding=1))
        got = _value_and_grads(eager.replace(engine="compiled", prefetch=prefetch), x, kernel, a, b,
                               True, dict(padding=1))
        assert rel_err(got, expected) < 1e-6


def _temp_bytes(h, budget, prefetch=1):
    """XLA's temporaries of the compiled forward and backward passes of one stats conv."""
    ex = Execution(budget, engine="compiled", prefetch=prefetch)
    x, kernel, a, b = _inputs(1, h, 64, 8, 8, 3)
    sizes = []
    for event in ("conv_forward", "conv_backward"):
        def observer(e, fn, *args, **kwargs):
            if e == event:
                sizes.append(fn.lower(*args, **kwargs).compile().memory_analysis().temp_size_in_bytes)
            return fn(*args, **kwargs)
        _value_and_grads(ex.replace(observer=observer), x, kernel, a, b, True, dict(padding=1))
    return sizes


def test_compiled_passes_hold_a_few_bands_whatever_the_input_size():
    """Device memory of a pass is its bands, not its activation: XLA's temporaries stay the same
    when the image gets 4x taller (the activation's own bytes are the program's arguments and
    outputs, host memory where copies are staged) and stay within a few budgets."""
    budget = 60_000
    small, large = _temp_bytes(96, budget), _temp_bytes(384, budget)
    activation = 384 * 64 * 8 * 4
    for s, l in zip(small, large):
        assert l <= 1.1 * s + 4096
        assert l < 3 * budget < activation
    single = _temp_bytes(384, budget, prefetch=0)
    assert all(s <= d <= 2 * s + 4096 for s, d in zip(single, large))  # two partitions' bands


def test_runs_group_partitions_of_one_shape_and_step():
    items = [(("a",), (0, 0)), (("b",), (0, 4)), (("b",), (0, 8)), (("b",), (0, 12)),
             (("c",), (0, 16)), (("b",), (1, 0)), (("b",), (1, 5))]
    got = compiled.runs(items)
    assert [(r.shape, r.start, r.step, r.count) for r in got] == [
        (("a",), (0, 0), (0, 0), 1), (("b",), (0, 4), (0, 4), 3), (("c",), (0, 16), (0, 0), 1),
        (("b",), (1, 0), (0, 5), 2)]
    assert got[1].at(2) == (0, 12)


def test_unknown_engine_is_a_value_error():
    with pytest.raises(ValueError, match="engine must be one of eager, compiled"):
        Execution(engine="fast")
