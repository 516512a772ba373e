"""In-RAM residuals behind reference-counted ``spill.Kept`` handles (issue 21, goal 1): each op's
backward frees what it read once its last reader is done, before the whole backward ends; a read
after the release is an error; a forward whose pullback is dropped leaks nothing."""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.layers import big_conv2d, spill
from bigjax.layers.host import affine_relu
from tests.layers.helpers import EX


@pytest.fixture
def kept(monkeypatch):
    """Every handle ``Execution.keep`` gives, with a weak reference to the array it holds."""
    handles, real = [], spill.keep_in_ram

    def recording(ex, x):
        v = real(ex, x)
        if isinstance(v, spill.Kept):
            handles.append((v, weakref.ref(v.get())))
        return v
    monkeypatch.setattr(spill, "keep_in_ram", recording)
    return handles


def _pullback(ex, seed=0):
    """A host op (affine ReLU) then a conv over odd shapes, many bands; its value and pullback."""
    rng = np.random.default_rng(seed)
    x = jax.device_put(rng.normal(size=(2, 23, 17, 3)).astype(np.float32), ex.host)
    a, b = jax.device_put(rng.normal(size=(2, 3)).astype(np.float32), ex.host)
    kernel = jax.device_put((rng.normal(size=(3, 3, 3, 4)) / 3).astype(np.float32), ex.compute)

    def loss(x, kernel):
        z = affine_relu(x, a, b, execution=ex)
        return jnp.sum(jax.device_put(big_conv2d(z, kernel, padding=1, execution=ex), ex.compute))

    value, pull = jax.vjp(loss, x, kernel)
    return value, pull, jax.device_put(np.float32(1), value.sharding)


def test_the_backward_frees_each_residual_after_its_last_read(kept):
    seen = {}

    def observer(event, fn, *args, **kwargs):
        if event == "host_backward" and not seen:  # the conv's backward (run first) has finished
            seen["conv input"] = kept[-1][1]()
        return fn(*args, **kwargs)
    ex = EX.replace(max_partition_bytes=8_000, observer=observer)
    _, pull, one = _pullback(ex)
    assert len(kept) == 2  # the host op's input, the conv's input (the host op's output)
    pull(one)
    assert seen == {"conv input": None}  # freed while the host op's backward was still to run
    assert all(h.nbytes == 0 and ref() is None for h, ref in kept)


def test_a_read_after_release_raises(kept):
    _, pull, one = _pullback(EX.replace(max_partition_bytes=8_000))
    pull(one)
    with pytest.raises(RuntimeError, match="released residual"):
        pull(one)


def test_a_dropped_pullback_frees_its_residuals(kept):
    value, pull, _ = _pullback(EX.replace(max_partition_bytes=8_000))
    refs = [ref for _, ref in kept]
    assert all(ref() is not None for ref in refs)
    del pull, kept[:]
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_one_handle_per_buffer_counts_its_readers():
    x = jax.device_put(np.ones((1, 2, 3, 4), np.float32), EX.host)
    first, second = EX.keep(x), EX.keep(x)
    assert first is second and first.readers == 2 and first.nbytes == x.nbytes
    spill.release(first)
    assert np.array_equal(EX.restore(first), x)
    spill.release(second)
    assert first.nbytes == 0
    with pytest.raises(RuntimeError, match="released residual"):
        EX.restore(first)
    assert EX.keep(np.ones(3)).shape == (3,)  # not a host activation: as it is
