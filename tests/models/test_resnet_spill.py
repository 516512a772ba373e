"""The spill store (``layers.spill``): a step with its activations on disk equals the step in RAM
bit for bit, leaves nothing behind, survives a killed run; a model reads its input from a store.

Bit for bit in float32 on purpose: the spilled step runs the same kernels on the same bands in the same
order, only the place the residuals wait in differs, so any difference at all is a bug."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx

from bigjax.layers import Execution
from bigjax.layers.spill import SpillStats
from bigjax.models.resnet import BigResNet

X = np.random.default_rng(0).normal(size=(2, 41, 35, 3)).astype(np.float32)  # odd sizes


def _step(model, x, ex, input_grad=False):
    """(loss, parameter gradients, [input gradient,] new batch statistics, inference embedding)."""
    weights = jax.device_put(np.random.default_rng(1).normal(size=model.embed_dim)
                             .astype(np.float32), ex.compute)

    def loss(m, x):
        return jnp.sum(m(x, train=True, execution=ex) * weights)

    m = nnx.clone(model)
    argnums = (0, 1) if input_grad else 0
    value, grads = nnx.value_and_grad(loss, argnums=argnums)(m, x)
    embedding = m(x, train=False, execution=ex)
    return value, grads, nnx.state(m, nnx.BatchStat), embedding


def _identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for u, v in zip(leaves_a, leaves_b):
        u, v = jax.device_get(u), jax.device_get(v)
        assert u.dtype == v.dtype and np.array_equal(u, v)


def _files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


@pytest.mark.parametrize("engine,whole,fused,host_dtype,stream", [
    ("eager", False, True, None, False),
    ("eager", False, True, None, True),
    ("compiled", True, True, None, False),
    pytest.param("eager", True, True, "bfloat16", True, marks=pytest.mark.slow),
    pytest.param("compiled", False, True, None, False, marks=pytest.mark.slow),
    pytest.param("eager", False, False, None, False, marks=pytest.mark.slow),
])
def test_a_step_with_every_activation_spilled_equals_the_step_in_ram(tmp_path, engine, whole,
                                                                     fused, host_dtype, stream):
    """host_memory=0: every residual activation goes to disk; forward, parameter and input
    gradients, BatchNorm statistics and the inference output equal the in-RAM step's exactly.
    The stem op by op, or streamed (``stream_stem``, pinned: by default it follows host_memory)."""
    model = BigResNet(18, big_stages=1, fused=fused, rngs=nnx.Rngs(2))
    ram = Execution(1_500_000, engine=engine, whole_blocks=whole, host_dtype=host_dtype,
                    stream_stem=stream)
    stats = SpillStats()
    spilled = ram.replace(host_memory=0, spill_dir=tmp_path, observer=stats)
    x = jax.device_put(X, ram.host)
    _identical(_step(model, x, ram, input_grad=True), _step(model, x, spilled, input_grad=True))
    assert stats.writes > 0 and stats.written > 0 and stats.read >= stats.written
    gc.collect()
    assert _files(tmp_path) == []  # every array's files removed once the backward consumed it
    assert spilled.spill.resident == 0


@pytest.mark.parametrize("fused,stream", [(True, False), (False, False), (True, True)])
def test_a_spilled_step_reads_its_activations_back_in_bands_of_a_partition(tmp_path, fused, stream):
    """Every residual spilled and partitions of 400 kB: the eager engine reads each activation back
    in bands no larger than a partition, never whole, in every op's backward (the conv's, the
    BatchNorm's two passes in the paper's separate ops, the pooling's, the ReLU's and add's), so a
    host budget bounds the backward too; and the step equals the step in RAM bit for bit. The stem
    op by op (fused, or the separate ops, which have no streamed stem) or streamed."""
    x = np.random.default_rng(0).normal(size=(1, 769, 43, 3)).astype(np.float32)
    model = BigResNet(18, big_stages=1, fused=fused, rngs=nnx.Rngs(2))
    reads = []

    def observer(event, fn, *args, **kwargs):
        if event == "spill_read":
            reads.append(args[0])
        return fn(*args, **kwargs)
    ram = Execution(400_000, whole_blocks=False, stream_stem=stream)
    spilled = ram.replace(host_memory=0, spill_dir=tmp_path, observer=observer)
    grad = not stream  # a differentiated input runs the stem op by op
    _identical(_step(model, jax.device_put(x, ram.host), ram, input_grad=grad),
               _step(model, jax.device_put(x, ram.host), spilled, input_grad=grad))
    largest = (385 * 22 if not stream else 193 * 11) * 64 * 4  # the stem conv's output, or its pool's
    assert len(reads) > 20 and largest > ram.max_partition_bytes
    assert max(reads) <= ram.max_partition_bytes


def test_no_partial_cotangent_outlives_the_sum_of_a_blocks_two_branches(tmp_path):
    """A block's input feeds its first conv and its shortcut; its cotangent is the sum of the two
    (``host.fork``). Left to JAX's backward pass, the partial added last stayed alive through the
    next op's pullback (the loop's ``cts_out``): a fourth activation at a spilled step's peak. With
    every activation spilled and read back in bands of a partition, no host op's backward sees two
    whole arrays of stage 1's activation made by the backward, besides its own arguments: the
    incoming cotangent alone (the in-memory tail keeps its input, made by the forward). The fused
    path: in the paper's separate ops a block's middle ReLU is a host op, whose backward rightly
    sees the shortcut's cotangent waiting for the main branch's. The step equals the step in RAM."""
    x = np.random.default_rng(0).normal(size=(1, 769, 43, 3)).astype(np.float32)
    model = BigResNet(18, big_stages=1, rngs=nnx.Rngs(2))
    activation = (1, 193, 11, 64)  # larger than a partition: no band is whole
    forward, seen = {}, []  # the spilled forward's arrays, held so that no new array reuses an id

    def observer(event, fn, *args, **kwargs):
        if event == "host_backward":
            own = forward.keys() | {id(a) for a in jax.tree.leaves(args)}
            seen.append(sum(a.shape == activation and id(a) not in own for a in jax.live_arrays()))
        return fn(*args, **kwargs)

    def loss(m, x, ex):
        y = m(x, train=True, execution=ex)
        if ex is spilled:
            forward.update((id(a), a) for a in jax.live_arrays() if a.shape == activation)
        return jnp.sum(y)
    ram = Execution(400_000, whole_blocks=False, stream_stem=True)
    spilled = ram.replace(host_memory=0, spill_dir=tmp_path, observer=observer)
    x = jax.device_put(x, ram.host)
    _identical(nnx.value_and_grad(loss)(nnx.clone(model), x, ram),
               nnx.value_and_grad(loss)(nnx.clone(model), x, spilled))
    assert np.prod(activation) * 4 > ram.max_partition_bytes
    assert len(seen) > 10 and max(seen) == 1


def test_a_budget_between_keeps_some_in_ram_and_the_result_is_the_same(tmp_path):
    """A host budget that holds some activations: those stay in RAM, the rest spill, same results;
    an activation saved by two ops (a conv's output, then the host op's input) is written once."""
    model = BigResNet(18, big_stages=1, rngs=nnx.Rngs(2))
    ram = Execution(1_500_000, whole_blocks=False, stream_stem=True)
    x = jax.device_put(X, ram.host)
    everything, some = SpillStats(), SpillStats()
    _step(model, x, ram.replace(host_memory=0, spill_dir=tmp_path, observer=everything))
    half = ram.replace(host_memory=everything.written // 2, spill_dir=tmp_path, observer=some)
    _identical(_step(model, x, ram), _step(model, x, half))
    assert 0 < some.written < everything.written
    conv_outputs = X.size // 3 * 64 // 4 * 5  # the stem's (stride 2) and stage 1's four convs
    assert everything.written < (X.size + conv_outputs) * 4 + X.nbytes


def test_spill_settings_are_checked():
    with pytest.raises(ValueError, match="needs spill_dir"):
        Execution(host_memory=2**20)
    with pytest.raises(ValueError, match="needs host_memory"):
        Execution(spill_dir="/tmp")
    with pytest.raises(ValueError, match="host_memory must be"):
        Execution(host_memory=-1, spill_dir="/tmp")


def test_a_dead_runs_directory_is_removed_before_the_next_writes(tmp_path):
    """What a killed run left (its pid's directory) is removed when a store next spills there."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f"bigjax-spill-{done.stdout.strip()}" / "7" / "c"
    stale.mkdir(parents=True)
    (stale / "0").write_bytes(b"half a band")
    model = BigResNet(18, big_stages=0, rngs=nnx.Rngs(2))
    ram = Execution(1_500_000, stream_stem=False)
    x = jax.device_put(X, ram.host)
    _identical(_step(model, x, ram), _step(model, x, ram.replace(host_memory=0, spill_dir=tmp_path)))
    assert [p.name for p in tmp_path.iterdir()] == [f"bigjax-spill-{os.getpid()}"]


_KILLED = textwrap.dedent("""
    import jax, numpy as np, jax.numpy as jnp, sys
    jax.config.update("jax_num_cpu_devices", 2)
    from flax import nnx
    from bigjax.layers import Execution
    from bigjax.models.resnet import BigResNet
    model = BigResNet(18, big_stages=4, rngs=nnx.Rngs(0))
    ex = Execution(20_000_000, host_memory=0, spill_dir=sys.argv[1], whole_blocks=False)
    x = np.random.default_rng(0).normal(size=(1, 256, 256, 3)).astype(np.float32)
    loss = lambda m, x: jnp.sum(m(x, train=True, execution=ex))
    while True:
        nnx.grad(loss)(model, x)
""")


@pytest.mark.slow
def test_a_killed_spilled_step_leaves_a_clean_rerun(tmp_path):
    """SIGKILL while a step has arrays on disk; the rerun (this process) spills into the same
    directory, removes the dead run's files and gets the in-RAM results."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(tmp_path)], env=env)
    deadline = time.time() + 120
    while not _files(tmp_path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _files(tmp_path), "the killed run had spilled nothing yet"
    model = BigResNet(18, big_stages=1, rngs=nnx.Rngs(2))
    ram = Execution(1_500_000, stream_stem=True)
    x = jax.device_put(X, ram.host)
    _identical(_step(model, x, ram), _step(model, x, ram.replace(host_memory=0, spill_dir=tmp_path)))
    gc.collect()
    assert _files(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == [f"bigjax-spill-{os.getpid()}"]


def _store(path, array, chunk_rows):
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
                     "metadata": {"shape": list(array.shape), "data_type": array.dtype.name,
                                  "chunk_grid": {"name": "regular", "configuration": {
                                      "chunk_shape": [*array.shape[:-3], chunk_rows,
                                                      *array.shape[-2:]]}}}},
                    create=True).result()
    store.write(array).result()
    return store


@pytest.mark.parametrize("engine,fused,hwc,stream", [
    ("eager", True, False, False), ("compiled", True, True, False), ("eager", True, True, True),
    pytest.param("eager", False, True, False, marks=pytest.mark.slow)])
def test_a_model_fed_a_tensorstore_array_equals_it_fed_the_array_in_ram(tmp_path, engine, fused,
                                                                        hwc, stream):
    """The stem reads its bands from the store (NHWC, or HWC for one image), op by op or streamed:
    loss, parameter gradients, statistics and inference output equal those of the same array in RAM."""
    model = BigResNet(18, big_stages=1, fused=fused, rngs=nnx.Rngs(2))
    ex = Execution(1_500_000, engine=engine, whole_blocks=False, stream_stem=stream)
    x = X[:1] if hwc else X
    store = _store(tmp_path / "slide", x[0] if hwc else x, chunk_rows=9)
    reads = []

    def observer(event, fn, *args, **kwargs):
        reads.append(event)
        return fn(*args, **kwargs)

    _identical(_step(model, jax.device_put(x, ex.host), ex),
               _step(model, store, ex.replace(observer=observer)))
    # the image came from the store, band by band, as input reads (the spill store's are its own)
    assert reads.count("input_read") > 0 and "spill_read" not in reads


def test_a_uint8_slide_is_read_as_the_models_floats(tmp_path):
    """A uint8 store (a slide's pixels) is converted as it is read: equal to the float array."""
    model = BigResNet(18, big_stages=0, rngs=nnx.Rngs(2))
    ex = Execution(1_500_000)
    pixels = np.random.default_rng(3).integers(0, 256, size=(1, 41, 35, 3), dtype=np.uint8)
    store = _store(tmp_path / "slide", pixels, chunk_rows=16)
    _identical(model(jax.device_put(pixels.astype(np.float32), ex.host), train=False, execution=ex),
               model(store, train=False, execution=ex))
