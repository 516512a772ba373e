"""The spill store at the layer level, under the transfer guards: a fused conv (prologue, statistics)
and a host op whose residuals wait on disk give exactly the results they give in RAM, and every band
written or read is announced with its bytes. Model-level checks: tests/models/test_resnet_spill.py."""

import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.layers import big_conv2d, big_conv2d_stats
from bigjax.layers.host import affine_relu
from bigjax.layers.spill import CHUNK_BYTES, Spilled, SpillStats
from tests.layers.helpers import EX

# exact equality in float32 on purpose: the same kernels run on the same bands in the same order


def _data(seed=0, n=2, h=37, w=29, cin=5, cout=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, h, w, cin)).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, cin, cout)) / 3).astype(np.float32)
    a, b = rng.normal(size=(2, cin)).astype(np.float32)
    return jax.device_put(x, EX.host), *jax.device_put((kernel, a, b), EX.compute)


def _grads(ex, x, kernel, a, b):
    """Gradients of a fused conv (relu(x*a+b) prologue, statistics) followed by a host ReLU."""
    weights = jax.device_put(np.linspace(-1, 1, 6, dtype=np.float32), ex.compute)

    def loss(x, kernel, a, b):
        y, mean, var = big_conv2d_stats(x, kernel, pre_scale=a, pre_shift=b, padding=1,
                                        execution=ex)
        z = affine_relu(y, mean, var, execution=ex)
        return jnp.sum(jax.device_put(z, ex.compute) * weights) + jnp.sum(mean * var)

    value, pull = jax.vjp(loss, x, kernel, a, b)
    return value, pull(jax.device_put(np.float32(1), value.sharding))


@pytest.mark.parametrize("engine", ["eager", "compiled"])
def test_spilled_conv_and_host_op_equal_them_in_ram(tmp_path, engine):
    args = _data()
    ram = EX.replace(max_partition_bytes=20_000, engine=engine)
    stats = SpillStats()
    spilled = ram.replace(host_memory=0, spill_dir=tmp_path, observer=stats)
    for u, v in zip(jax.tree.leaves(_grads(ram, *args)), jax.tree.leaves(_grads(spilled, *args))):
        assert np.array_equal(jax.device_get(u), jax.device_get(v))
    x, y = args[0], (2, 37, 29, 6)  # spilled: the conv's input and output (the host op's input)
    assert stats.written == x.nbytes + np.prod(y) * 4
    assert stats.writes == 2 * 2  # one band per image: each is within CHUNK_BYTES
    assert stats.read >= stats.written
    gc.collect()
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs]


def test_large_activations_are_written_in_row_bands(tmp_path, monkeypatch):
    """An image larger than a chunk is written as several row bands, each read back as needed."""
    monkeypatch.setattr("bigjax.layers.spill.CHUNK_BYTES", 29 * 5 * 4 * 8)  # 8 rows of x
    args = _data()
    stats = SpillStats()
    ex = EX.replace(max_partition_bytes=20_000, host_memory=0, spill_dir=tmp_path, observer=stats)
    ram = EX.replace(max_partition_bytes=20_000)
    for u, v in zip(jax.tree.leaves(_grads(ram, *args)), jax.tree.leaves(_grads(ex, *args))):
        assert np.array_equal(jax.device_get(u), jax.device_get(v))
    assert stats.writes == 2 * (5 + 7)  # per image: 37 rows of x by 8, of y (6 channels) by 6
    assert CHUNK_BYTES > 29 * 5 * 4 * 8


def _spilled_arrays(root):
    return sorted((p.name for p in root.glob("bigjax-spill-*/*")), key=int)  # in the order written


def test_each_backward_removes_the_files_it_read_last(tmp_path):
    """A conv, then a host op: once the host op's backward (run first) has read its input, that
    input's files are gone while the conv's input waits on disk for the conv's backward; after the
    pass nothing is left, and a second pass fails loudly instead of reading removed files."""
    seen = []

    def observer(event, fn, *args, **kwargs):
        if event == "conv_backward" and not seen:
            seen.append(_spilled_arrays(tmp_path))
        return fn(*args, **kwargs)
    ex = EX.replace(max_partition_bytes=8_000, host_memory=0, spill_dir=tmp_path, observer=observer)
    x, kernel, a, b = _data(h=23, w=17, cout=5)

    def loss(x, kernel):
        z = affine_relu(big_conv2d(x, kernel, padding=1, execution=ex), a, b, execution=ex)
        return jnp.sum(jax.device_put(z, ex.compute))

    value, pull = jax.vjp(loss, x, kernel)
    written = _spilled_arrays(tmp_path)
    assert len(written) == 2 and ex.spill.on_disk == 2 * x.nbytes  # the conv's input, the host op's
    one = jax.device_put(np.float32(1), value.sharding)
    pull(one)
    assert seen == [written[:1]]  # the conv's input (written first) is all that was left
    assert _spilled_arrays(tmp_path) == [] and ex.spill.on_disk == 0
    assert ex.spill.peak_on_disk == 2 * x.nbytes
    with pytest.raises(RuntimeError, match="released residual"):
        pull(one)


def test_the_budget_keeps_room_for_three_activations_in_flight(tmp_path, caplog):
    """An activation stays in RAM only while the kept ones, it and room for ``IN_FLIGHT`` (3)
    activations as large as the largest yet fit ``host_memory``: the cotangents of a residual
    block's backward, which no residual counts. A budget below that room spills everything, said
    in the log, and said again with the figure of a larger activation that follows."""
    from bigjax.layers.spill import IN_FLIGHT, SpillStore

    assert IN_FLIGHT == 3
    xs = [jax.device_put(np.full((1, 8, 8, 4), i, np.float32), EX.host) for i in range(3)]
    size = xs[0].nbytes
    for budget, in_ram in [(4 * size, 1), (5 * size, 2), (6 * size, 3), (4 * size - 1, 0)]:
        store = SpillStore(budget, tmp_path)
        kept = [store.keep(EX, x) for x in xs]
        assert [not isinstance(k, Spilled) for k in kept] == [True] * in_ram + [False] * (3 - in_ram)
        assert store.resident == in_ram * size
    assert "host_memory" not in caplog.text
    with caplog.at_level("WARNING", "bigjax.layers.spill"):
        store = SpillStore(2 * size, tmp_path)
        kept = [store.keep(EX, x) for x in xs]
    assert all(isinstance(k, Spilled) for k in kept)
    warnings = [r.getMessage() for r in caplog.records if r.name == "bigjax.layers.spill"]
    assert len(warnings) == 1 and "below the room for 3 activations" in warnings[0]
    with caplog.at_level("WARNING", "bigjax.layers.spill"):
        store.keep(EX, jax.device_put(np.ones((1, 16, 8, 4), np.float32), EX.host))  # twice the size
        store.keep(EX, xs[0])  # not larger: nothing new to say
    warnings = [r for r in caplog.records if r.name == "bigjax.layers.spill"]
    assert [r.args[2] for r in warnings] == [size / 2**30, 2 * size / 2**30]  # the largest, in GiB


def test_a_held_activation_is_written_once_and_its_copy_kept_for_the_ops_that_keep_it(tmp_path):
    """``hold`` beyond the budget writes an activation a caller holds (a local module's output) and
    ``take`` reads it back; an op keeping the array taken keeps that copy, with no second write. The
    copy lives until its last reader: the op's backward, and the holder, whose read is released when
    the taken array dies. Within the budget ``hold`` gives the array itself, counted in it."""
    from bigjax.layers import spill

    stats = SpillStats()
    ex = EX.replace(host_memory=0, spill_dir=tmp_path, observer=stats)
    x = _data(h=23, w=17)[0]
    held = ex.hold(x)
    assert isinstance(held, Spilled) and stats.written == x.nbytes
    taken = ex.take(held)
    assert np.array_equal(jax.device_get(taken), jax.device_get(x))
    kept = ex.keep(taken)
    assert kept is held and held.readers == 2 and stats.written == x.nbytes
    del taken
    gc.collect()
    assert held.readers == 1 and not held.removed
    spill.release(kept)
    assert held.removed and _spilled_arrays(tmp_path) == []
    ram = EX.replace(host_memory=4 * x.nbytes, spill_dir=tmp_path)  # x and the room for 3 in flight
    assert ram.hold(x) is x and ram.take(x) is x and ram.spill.resident == x.nbytes
    assert EX.hold(x) is x


def test_a_held_activation_taken_where_the_budget_has_room_again_comes_back_to_ram(tmp_path):
    """Held while another activation filled the budget, an activation is written; taken after that
    one died (a module's residuals, freed by its backward), it is kept in RAM, counted, and its copy
    on disk removed: where it lives is decided where it is used."""
    x = _data(h=23, w=17)[0]
    ex = EX.replace(host_memory=5 * x.nbytes - 1, spill_dir=tmp_path)  # room for 3, then 1 more
    other = ex.spill.keep(ex, _data(seed=1, h=23, w=17)[0])
    held = ex.hold(x)
    assert other is not held and not isinstance(other, Spilled) and isinstance(held, Spilled)
    del other
    gc.collect()
    taken = ex.take(held)
    assert held.removed and ex.spill.resident == x.nbytes and ex.keep(taken).get() is taken
    assert np.array_equal(jax.device_get(taken), jax.device_get(x))


def test_a_band_read_back_is_the_buffer_it_was_read_into(tmp_path, monkeypatch):
    """A spilled band is read into a buffer of the engine's own that the host device adopts as the
    band's array, uncopied (tensorstore's own output array is misaligned for XLA, which copied it),
    in float32 and bfloat16, from the spill store and from a caller's store of another dtype."""
    import tensorstore as ts

    from bigjax.layers import spill

    into = []
    start = spill._start_read
    monkeypatch.setattr(spill, "_start_read", lambda *a: into.append(a[-1]) or start(*a))
    ex = EX.replace(host_memory=0, spill_dir=tmp_path)
    x = _data(h=23, w=17)[0]
    slide = ts.array(np.arange(23 * 17 * 5, dtype=np.uint8).reshape(23, 17, 5))
    for v, want in [(ex.hold(x), x), (ex.hold(x.astype(jnp.bfloat16)), x.astype(jnp.bfloat16)),
                    (spill.from_store(slide, np.float32), slide.read().result()[None])]:
        band = spill.read_finish(ex, spill.read_start(ex, v, 1 if v.shape[0] > 1 else 0, None, 3, 20))
        assert band.unsafe_buffer_pointer() == into[-1].ctypes.data
        assert band.dtype == v.dtype and band.devices() == {ex.host}
        assert np.array_equal(jax.device_get(band), np.asarray(want)[-1:, 3:20].astype(v.dtype))
