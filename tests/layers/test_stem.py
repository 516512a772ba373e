"""The streamed stem (``layers.stem``) against the stem in memory, in float64 on odd shapes and budgets
that force many bands: pooled output, kernel and BatchNorm gradients, running statistics, inference;
its conv output is never whole; the settings that choose it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx

from bigjax.layers import Execution
from bigjax.layers.modules import BigBatchNorm, BigConv
from bigjax.layers.spill import from_store
from bigjax.local.group_norm import BigGroupNorm
from bigjax.models.resnet_paths import Fused, InMemory, stem
from tests.layers.helpers import rel_err

RNG = np.random.default_rng(0)


def _modules(dtype, norm=BigBatchNorm, stride=2):
    conv, bn = BigConv(3, 8, 7, stride=stride, padding=3, rngs=nnx.Rngs(1)), norm(8)
    bn.scale[...] = jnp.asarray(RNG.uniform(0.5, 1.5, 8))
    bn.bias[...] = jnp.asarray(RNG.normal(size=8))
    modules = nnx.List([conv, bn])
    nnx.update(modules, jax.tree.map(lambda v: v.astype(dtype), nnx.state(modules)))
    return modules


def _run(path, modules, x, w, train):
    """(loss, parameter gradients, running statistics after) of sum(stem(x) * w), the stem's output
    moved where ``w`` is."""
    def loss(m):
        y = stem(path, x, m[0], m[1], train)
        return jnp.sum(jax.device_put(y, w.sharding) * w)

    m = nnx.clone(modules)
    value, grads = nnx.value_and_grad(loss)(m)
    return value, grads, nnx.state(m, nnx.BatchStat)


@pytest.mark.parametrize("shape,budget,train", [
    ((2, 37, 29, 3), 200_000, True),  # bands of a few rows, two images
    ((1, 52, 23, 3), 55_000, True),  # bands of 3-4 rows, near the smallest
    ((3, 19, 21, 3), 10**8, True),  # whole images per partition
    ((2, 37, 29, 3), 200_000, False),
])
def test_the_streamed_stem_equals_the_stem_in_memory(shape, budget, train):
    events = []

    def observer(event, fn, *args, **kwargs):
        events.append(event)
        return fn(*args, **kwargs)

    with jax.enable_x64(True), jax.transfer_guard("allow"):
        modules = _modules(np.float64)
        x = RNG.normal(size=shape) * 3 + 1
        ex = Execution(budget, whole_blocks=False, stream_stem=True, observer=observer)
        pooled = jax.eval_shape(lambda m: stem(InMemory, x, m[0], m[1], False), modules).shape
        w = jnp.asarray(RNG.normal(size=pooled))
        ours = _run(Fused(ex), modules, ex.to_host(x), ex.to_compute(w), train)
        theirs = _run(InMemory, modules, jnp.asarray(x), w, train)
    assert rel_err(ours[0], theirs[0]) < 1e-12
    for a, b in zip(nnx.to_flat_state(ours[1]), nnx.to_flat_state(theirs[1])):
        assert a[0] == b[0] and rel_err(a[1].get_value(), b[1].get_value()) < 1e-11, a[0]
    assert rel_err(jax.tree.leaves(ours[2]), jax.tree.leaves(theirs[2])) < 1e-12
    assert "host_forward" not in events  # no op-by-op host op ran: the stem was streamed
    if budget < 10**6:
        passes = 2 if train else 1  # the moments' backward, in training; the pool's
        assert events.count("conv_backward") >= passes * 4  # many bands in each


def test_the_conv_output_is_never_whole_and_the_input_from_a_store_gives_the_same_bits(tmp_path):
    """No event of a streamed step from a store returns more than a band: neither the input nor the
    conv output (37 x 36 x 8 values) nor its cotangent ever exists whole; the results equal those
    of the input in RAM bit for bit."""
    biggest = []

    def observer(event, fn, *args, **kwargs):
        out = fn(*args, **kwargs)
        biggest.append((event, max((v.nbytes for v in jax.tree.leaves(out) if hasattr(v, "nbytes")),
                           default=0)))
        return out

    shape = (1, 73, 71, 3)
    x = RNG.normal(size=shape).astype(np.float32)
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "x")},
                     "metadata": {"shape": list(shape), "data_type": "float32"}},
                    create=True).result()
    store.write(x).result()
    with jax.transfer_guard("allow"):
        modules = _modules(np.float32)
        ex = Execution(60_000, whole_blocks=False, stream_stem=True, observer=observer)
        w = ex.to_compute(jnp.asarray(RNG.normal(size=(1, 19, 18, 8)), np.float32))
        from_ram = _run(Fused(ex), modules, ex.to_host(x), w, True)
        biggest.clear()
        from_slide = _run(Fused(ex), modules, from_store(store), w, True)
    conv_output = 37 * 36 * 8 * 4
    assert 0 < max(b for _, b in biggest) < conv_output / 2  # an input band, halo included
    for a, b in zip(jax.tree.leaves(from_ram), jax.tree.leaves(from_slide)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_group_norm_stem_streams_in_evaluation_too():
    """GroupNorm (the local whole-slide network's, stem stride 3) normalises by the map's own
    statistics in evaluation as well: the streamed stem computes them then too."""
    with jax.enable_x64(True), jax.transfer_guard("allow"):
        modules = _modules(np.float64, BigGroupNorm, stride=3)
        x = RNG.normal(size=(1, 44, 31, 3))
        ex = Execution(60_000, whole_blocks=False, stream_stem=True)
        pooled = jax.eval_shape(lambda m: stem(InMemory, x, m[0], m[1], False), modules).shape
        w = jnp.asarray(RNG.normal(size=pooled))
        ours = _run(Fused(ex), modules, ex.to_host(x), ex.to_compute(w), False)
        theirs = _run(InMemory, modules, jnp.asarray(x), w, False)
    assert rel_err(ours[:2], theirs[:2]) < 1e-11


def test_stream_stem_follows_host_memory_and_host_dtype_and_needs_the_eager_engine(tmp_path):
    assert not Execution().streams_stem
    assert Execution(host_memory=0, spill_dir=tmp_path).streams_stem
    assert Execution(host_dtype=jnp.bfloat16).streams_stem
    assert not Execution(host_dtype=jnp.bfloat16, engine="compiled").streams_stem
    assert not Execution(host_dtype=jnp.bfloat16, stream_stem=False).streams_stem
    assert not Execution(host_memory=0, spill_dir=tmp_path, engine="compiled").streams_stem
    assert not Execution(host_memory=0, spill_dir=tmp_path, stream_stem=False).streams_stem
    assert Execution(stream_stem=True).streams_stem
    with pytest.raises(ValueError, match="stream_stem needs the eager engine"):
        Execution(stream_stem=True, engine="compiled")


def test_a_differentiated_input_takes_the_op_by_op_stem():
    """The streamed stem has no input gradient: differentiated, the stem runs op by op and the
    input gradient equals the one in memory."""
    with jax.transfer_guard("allow"):
        modules = _modules(np.float32)
        x = RNG.normal(size=(1, 21, 17, 3)).astype(np.float32)
        ex = Execution(10**7, whole_blocks=False, stream_stem=True)

        def loss(x, path, place):
            return jnp.sum(place(stem(path, x, modules[0], modules[1], False)))

        ours = jax.grad(loss)(ex.to_host(x), Fused(ex), ex.to_compute)
        theirs = jax.grad(loss)(jnp.asarray(x), InMemory, lambda v: v)
    assert rel_err(ours, theirs) < 1e-5
