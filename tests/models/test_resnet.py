import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.layers import Execution
from bigjax.models.resnet import BigResNet, ResNet, in_memory_twin, load_torchvision
from bigjax.bench.traffic import Traffic
from tests.layers.helpers import EX, in_device_memory, rel_err

X = np.random.default_rng(0).normal(size=(2, 61, 45, 3)).astype(np.float32)  # odd sizes

# (depth, big_stages, fused, budget): budgets force many partitions in the big stages; with all four
# stages big the 3x3x512x512 kernels of stage 4 (and their gradients) alone need about 19 MB.
CONFIGS = [
    (18, 4, True, 20_000_000),
    (18, 2, True, 1_400_000),
    (18, 1, False, 400_000),
    (18, 0, True, 150_000),
]
SLOW_CONFIGS = [(18, 4, False, 20_000_000), (34, 1, True, 400_000)]
# ResNet-50 on a 61x45 input normalises stage 4 over 2x2x2 values: in float32 the twin and the big
# model differ by round-off amplified up to ~30% there (both ways of summing are "right"), so
# ResNet-50 is compared in float64, where the two agree to ~1e-12.
CONFIGS_50 = [(50, 2, True, 3_000_000), (50, 4, True, 80_000_000), (50, 0, False, 300_000),
              (50, 1, True, 1_000_000)]


def _loss(weights, execution=None):
    """sum(embedding * weights): the twin is called plainly, a Big model with ``execution``."""
    def loss(m, x):
        kwargs = {} if execution is None else {"execution": execution}
        return jnp.sum(m(x, train=True, **kwargs) * weights)
    return loss


def _weights(model, n, dtype):
    return jnp.asarray(np.random.default_rng(1).normal(size=(n, model.embed_dim)), dtype)


def _grads(model, jit, x=X, execution=None, argnums=0):
    weights = _weights(model, len(x), x.dtype)
    step = nnx.value_and_grad(_loss(weights, execution), argnums=argnums)
    return (nnx.jit(step) if jit else step)(model, x)


def _compare(depth, big_stages, fused, budget, dtype=np.float32, tol=1e-4, engine="eager",
             whole_blocks=False, observer=None):
    """The Big model's loss, gradients, running statistics and embedding against the twin's; by
    default every block streams op by op (the ops under test), ``whole_blocks`` as a user runs."""
    model = BigResNet(depth, big_stages=big_stages, fused=fused, rngs=nnx.Rngs(depth))
    nnx.update(model, jax.tree.map(lambda v: v.astype(dtype), nnx.state(model)))
    x = X.astype(dtype)
    ex = Execution(budget, engine=engine, whole_blocks=whole_blocks, observer=observer)
    twin = in_memory_twin(model)
    loss, grads = _grads(model, jit=False, x=x, execution=ex)
    twin_loss, twin_grads = _grads(twin, jit=True, x=x)
    assert rel_err(loss, twin_loss) < tol
    _assert_same_grads(grads, twin_grads, dtype, tol)
    stats = dict(nnx.to_flat_state(nnx.state(twin, nnx.BatchStat)))
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
        assert rel_err(v.get_value(), stats[path].get_value()) < tol, path
    emb = model(x, train=False, execution=ex)
    assert emb.shape == (2, model.embed_dim) and emb.devices() == {ex.compute}
    assert rel_err(emb, nnx.jit(lambda m, x: m(x, train=False))(twin, x)) < tol


def _assert_same_grads(grads, expected, dtype=np.float32, tol=1e-4):
    ours, theirs = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(expected))
    assert ours.keys() == theirs.keys()
    for path in ours:
        assert ours[path].get_value().dtype == dtype
        assert rel_err(ours[path].get_value(), theirs[path].get_value()) < tol, path


@pytest.mark.parametrize("depth,big_stages,fused,budget", CONFIGS)
def test_big_resnet_equals_in_memory_twin(depth, big_stages, fused, budget):
    _compare(depth, big_stages, fused, budget)


@pytest.mark.parametrize("depth,big_stages,fused,budget", [
    pytest.param(18, 4, True, 20_000_000, marks=pytest.mark.slow), (18, 2, True, 1_400_000)])
def test_big_resnet_on_the_compiled_engine_equals_in_memory_twin(depth, big_stages, fused, budget):
    _compare(depth, big_stages, fused, budget, engine="compiled")


@pytest.mark.parametrize("big_stages,budget,whole", [
    (4, 20_000_000, 7), pytest.param(2, 2_000_000, 2, marks=pytest.mark.slow)])
def test_blocks_that_fit_run_whole_the_others_op_by_op_and_equal_the_twin(big_stages, budget,
                                                                          whole):
    """``whole_blocks`` (the default): the blocks whose programs fit the budget run whole (7 of the
    stem and 8 blocks at 20 MB, 2 of the stem and the 4 blocks of stages 1-2 at 2 MB), the rest
    stream op by op."""
    events = []

    def observer(event, fn, *args, **kwargs):
        events.append(event)
        return fn(*args, **kwargs)

    _compare(18, big_stages, True, budget, whole_blocks=True, observer=observer)
    assert events.count("whole_backward") == whole and events.count("conv_backward") > 0
    assert events.count("whole_forward") == 2 * whole  # the step, then one call in inference


@pytest.mark.slow
@pytest.mark.parametrize("depth,big_stages,fused,budget", SLOW_CONFIGS)
def test_big_resnet_equals_in_memory_twin_more_configs(depth, big_stages, fused, budget):
    if depth == 18:
        _compare(depth, big_stages, fused, budget)
        return
    # ResNet-34 normalises stage 4 over 2x2x2 values too (see CONFIGS_50): in float32 on an AMD EPYC
    # the stem's BatchNorm bias gradients of the two differ by 0.77 % (1e-4 holds on the Xeon);
    # float64 with twice the budget: the same partitions
    with jax.enable_x64(True):
        _compare(depth, big_stages, fused, 2 * budget, dtype=np.float64, tol=1e-9)


@pytest.mark.parametrize("depth,big_stages,fused,budget", [
    CONFIGS_50[0], *(pytest.param(*c, marks=pytest.mark.slow) for c in CONFIGS_50[1:])])
def test_big_resnet50_equals_in_memory_twin_in_float64(depth, big_stages, fused, budget):
    with jax.enable_x64(True):
        _compare(depth, big_stages, fused, budget, dtype=np.float64, tol=1e-9)


def test_narrow_host_activations_halve_the_bytes_and_stay_close_to_wide_ones():
    """float64 model, activations kept in float32 between ops (``host_dtype``): what bfloat16 is to
    float32, with a reference precise enough to tell rounding from a bug."""
    with jax.enable_x64(True):
        model = BigResNet(18, big_stages=1, rngs=nnx.Rngs(4))
        nnx.update(model, jax.tree.map(lambda v: v.astype(np.float64), nnx.state(model)))
        x = X.astype(np.float64)
        runs = {}
        for host_dtype in (None, np.float32):
            # the stem op by op in both (a narrow host_dtype streams it by default, moving more)
            traffic = Traffic(Execution(900_000, host_dtype=host_dtype, stream_stem=False))
            crossed = set()

            def observer(event, fn, *args, traffic=traffic, crossed=crossed, **kwargs):
                if event in ("to_host", "to_compute") and np.shape(args[0])[:1] == (len(X),):
                    crossed.add(np.dtype(args[0].dtype))
                return traffic(event, fn, *args, **kwargs)

            ex = traffic.execution.replace(observer=observer)
            runs[host_dtype] = (*_grads(model, jit=False, x=x, execution=ex), traffic, crossed)
    (loss, grads, wide, _), (narrow_loss, narrow_grads, narrow, crossed) = runs.values()
    assert crossed == {np.dtype(np.float32)}  # every activation band that moved, the input cast
    assert 0 < rel_err(narrow_loss, loss) < 1e-6
    _assert_same_grads(narrow_grads, grads, np.float64, tol=1e-4)
    # half, plus the halo rows of the narrow plan's bands (its widened copies make them shorter)
    moved = {k: narrow.bytes[k] / wide.bytes[k] for k in wide.bytes}
    assert all(0.5 <= r < 0.55 for r in moved.values()), moved


def test_narrow_host_activations_need_the_fused_path():
    model = BigResNet(18, big_stages=0, fused=False)
    with pytest.raises(ValueError, match="fused path"):
        model(X, train=False, execution=Execution(host_dtype=jnp.bfloat16))


def test_big_activations_live_in_host_memory_after_forward():
    model = BigResNet(18, big_stages=4)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def embed(params):
        return nnx.merge(graphdef, params, rest)(X, train=False, execution=Execution(20_000_000))

    _, pull = jax.vjp(embed, params)  # keeps every residual of the forward alive
    activations = [a for a in jax.live_arrays() if a.ndim == 4 and a.shape[0] == X.shape[0]]
    # host RAM: the host device's memory, or (on a GPU) the pinned_host buffers backing host arrays
    assert len(activations) >= 10
    assert not any(in_device_memory(a, EX.compute) for a in activations)
    assert any(a.devices() == {EX.host} or a.sharding.memory_kind == "pinned_host"
               for a in activations)
    del pull


# Budgets that cut the stem's 7x7 conv into row bands (its output band alone is 2-3 buffers of
# H/2 x W/2 x 64 values per image) while the stage kernels (3x3x512x512 in stage 4) still fit. In float64:
# at 449x361, batch 1, the twin's own float32 input gradient is 3% off its float64 one (BatchNorm over
# 15x12 values in stage 4 amplifies round-off), so float32 cannot tell a bug from round-off there.
@pytest.mark.parametrize("big_stages,shape,budget", [(4, (1, 449, 361, 3), 42_000_000),
                                                     (2, (1, 181, 133, 3), 2_800_000)])
def test_input_gradient_of_big_resnet_equals_the_twins(big_stages, shape, budget):
    with jax.enable_x64(True):
        x = np.random.default_rng(2).normal(size=shape)
        model = BigResNet(18, big_stages=big_stages, rngs=nnx.Rngs(3))
        nnx.update(model, jax.tree.map(lambda v: v.astype(np.float64), nnx.state(model)))
        twin = in_memory_twin(model)
        stem_bands = []

        def observer(event, fn, *args, **kwargs):
            if event == "conv_forward" and args[0].shape[-1] == 3:
                stem_bands.append(args[0].shape)
            return fn(*args, **kwargs)

        ex = Execution(budget, observer=observer)
        _, dx = _grads(model, jit=False, x=x, execution=ex, argnums=1)
        _, dx_twin = _grads(twin, jit=True, x=x, argnums=1)
    assert len(stem_bands) > 1 and all(band[1] < shape[1] for band in stem_bands)
    assert dx.shape == x.shape and dx.dtype == np.float64
    assert rel_err(dx, dx_twin) < 1e-9


def test_two_engines_on_two_compute_devices_give_the_same_gradients():
    devices = jax.devices()
    assert len(devices) >= 2
    first = BigResNet(18, big_stages=1, rngs=nnx.Rngs(5))
    second = nnx.clone(first)
    kernel_devices = {0: set(), 1: set()}

    def on(i):
        def observer(event, fn, *args, **kwargs):
            if event in ("conv_forward", "conv_backward"):
                for leaf in filter(lambda v: isinstance(v, jax.Array), jax.tree.leaves(args)):
                    kernel_devices[i] |= leaf.devices()
            return fn(*args, **kwargs)
        return observer

    ex0 = Execution(400_000, compute=devices[0], host=devices[1], observer=on(0))
    ex1 = Execution(400_000, compute=devices[1], host=devices[0], observer=on(1))
    loss0, g0 = _grads(first, jit=False, execution=ex0)
    loss1, g1 = _grads(second, jit=False, execution=ex1)
    assert kernel_devices == {0: {devices[0]}, 1: {devices[1]}}
    assert rel_err(loss1, loss0) < 1e-6
    _assert_same_grads(g1, g0, tol=1e-6)


def _torch_names(model, rng):
    """torchvision-style tensors for ``model``: OIHW conv weights, bn weight/bias/running stats."""
    leaf = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
        shape = var.get_value().shape
        name = ".".join(map(str, path[:-1]))
        if path[-1] == "kernel":
            out[f"{name}.weight"] = rng.normal(size=(shape[3], shape[2], *shape[:2]))
        else:
            out[f"{name}.{leaf[path[-1]]}"] = rng.uniform(0.5, 1.5, size=shape)
    out["fc.weight"], out["bn1.num_batches_tracked"] = rng.normal(size=(1000, 512)), np.array(7)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def test_load_torchvision_from_safetensors_file(tmp_path):
    from safetensors.numpy import save_file

    model = ResNet(18)
    tensors = _torch_names(model, np.random.default_rng(0))
    assert "layer2.0.downsample.0.weight" in tensors and "layer1.1.bn2.running_var" in tensors
    save_file(tensors, str(tmp_path / "r18.safetensors"))
    load_torchvision(model, tmp_path / "r18.safetensors")
    kernel = tensors["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(model.layer2[0].downsample[0].kernel[...], kernel)
    np.testing.assert_array_equal(model.layer1[1].bn2.var[...], tensors["layer1.1.bn2.running_var"])
    np.testing.assert_array_equal(model.bn1.scale[...], tensors["bn1.weight"])


def test_load_torchvision_names_the_bad_key():
    model = ResNet(18)
    good = _torch_names(model, np.random.default_rng(0))
    with pytest.raises(KeyError, match="layer9.0.conv1.weight"):
        load_torchvision(model, {**good, "layer9.0.conv1.weight": np.zeros(1)})
    with pytest.raises(KeyError, match="layer1.0.bn1.running_mean"):
        load_torchvision(model, {k: v for k, v in good.items() if k != "layer1.0.bn1.running_mean"})
    with pytest.raises(ValueError, match="conv1.weight"):
        load_torchvision(model, {**good, "conv1.weight": np.zeros((64, 3, 3, 3), np.float32)})


@pytest.mark.parametrize("engine", ["eager", "compiled"])
def test_a_big_resnet_step_reads_nothing_back_before_the_loss(monkeypatch, engine):
    """No blocking device->host read in a whole training step: every np.asarray of a device array,
    jax.device_get and block_until_ready is counted; only the window's waits (a wait for the device,
    not a read) may block, and they go through the ``wait`` event."""
    from jax._src.array import ArrayImpl

    counts = {"read": 0, "block": 0}
    inside_wait = [False]

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            counts[kind] += not inside_wait[0]
            return fn(*args, **kwargs)
        return wrapper

    def observer(event, fn, *args, **kwargs):
        inside_wait[0] = event == "wait"
        try:
            return fn(*args, **kwargs)
        finally:
            inside_wait[0] = False

    model = BigResNet(18, big_stages=2, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(1, 131, 97, 3)).astype(np.float32)
    ex = Execution(1_500_000, prefetch=1, observer=observer, engine=engine)  # stem in row bands
    def loss(m, x):
        e = m(x, train=True, execution=ex)
        return jnp.sum(e * e)

    nnx.value_and_grad(loss)(model, x)  # compile outside the count
    monkeypatch.setattr(ArrayImpl, "__array__", counted("read", ArrayImpl.__array__))
    monkeypatch.setattr(jax, "device_get", counted("read", jax.device_get))
    monkeypatch.setattr(jax, "block_until_ready", counted("block", jax.block_until_ready))
    value, grads = nnx.value_and_grad(loss)(model, x)
    assert counts == {"read": 0, "block": 0}
    monkeypatch.undo()
    assert np.isfinite(float(value))


def test_a_big_step_after_an_update_compiles_nothing_new():
    """A model's initial parameters are uncommitted arrays, its updated ones committed: the engine
    commits what it sends to the compute device, so the band kernels compiled in the first step serve
    every later one (before, the second step recompiled about 50 of them). All stages big: a jitted
    tail of the model's own (``nnx.jit``) recompiles once for committed parameters, as any jitted step."""
    from jax import monitoring

    compiles = [0]
    monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: compiles.__setitem__(0, compiles[0] + event.endswith(
            "backend_compile_duration")))
    model = BigResNet(18, big_stages=4, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(1, 67, 53, 3)).astype(np.float32)
    ex = Execution(20_000_000)
    loss = lambda m, x: jnp.mean(m(x, train=True, execution=ex) ** 2)
    _, grads = nnx.value_and_grad(loss)(model, x)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.jit(lambda p, g: jax.tree.map(lambda a, b: a - 1e-3 * b, p, g))(
        params, grads))
    assert all(p.committed for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    before = compiles[0]
    nnx.value_and_grad(loss)(model, x)
    assert compiles[0] == before
