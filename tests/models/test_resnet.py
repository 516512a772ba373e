import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.layers import compute_device, host_device
from bigjax.models.resnet import BigResNet, ResNet, in_memory_twin, load_torchvision
from tests.layers.helpers import in_device_memory, rel_err

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


def _grads(model, jit, x=X):
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, model.embed_dim)), x.dtype)

    def loss(m, x):
        return jnp.sum(m(x, train=True) * weights)

    step = nnx.value_and_grad(loss)
    return (nnx.jit(step) if jit else step)(model, x)


def _compare(depth, big_stages, fused, budget, dtype=np.float32, tol=1e-4):
    model = BigResNet(depth, big_stages=big_stages, max_partition_bytes=budget, fused=fused,
                      rngs=nnx.Rngs(depth))
    nnx.update(model, jax.tree.map(lambda v: v.astype(dtype), nnx.state(model)))
    x = X.astype(dtype)
    twin = in_memory_twin(model)
    loss, grads = _grads(model, jit=False, x=x)
    twin_loss, twin_grads = _grads(twin, jit=True, x=x)
    assert rel_err(loss, twin_loss) < tol
    ours, theirs = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(twin_grads))
    assert ours.keys() == theirs.keys()
    for path in ours:
        assert ours[path].get_value().dtype == dtype
        assert rel_err(ours[path].get_value(), theirs[path].get_value()) < tol, path
    stats = dict(nnx.to_flat_state(nnx.state(twin, nnx.BatchStat)))
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
        assert rel_err(v.get_value(), stats[path].get_value()) < tol, path
    emb = model(x, train=False)
    assert emb.shape == (2, model.embed_dim) and emb.devices() == {compute_device()}
    assert rel_err(emb, nnx.jit(lambda m, x: m(x, train=False))(twin, x)) < tol


@pytest.mark.parametrize("depth,big_stages,fused,budget", CONFIGS)
def test_big_resnet_equals_in_memory_twin(depth, big_stages, fused, budget):
    _compare(depth, big_stages, fused, budget)


@pytest.mark.slow
@pytest.mark.parametrize("depth,big_stages,fused,budget", SLOW_CONFIGS)
def test_big_resnet_equals_in_memory_twin_more_configs(depth, big_stages, fused, budget):
    _compare(depth, big_stages, fused, budget)


@pytest.mark.parametrize("depth,big_stages,fused,budget", [
    CONFIGS_50[0], *(pytest.param(*c, marks=pytest.mark.slow) for c in CONFIGS_50[1:])])
def test_big_resnet50_equals_in_memory_twin_in_float64(depth, big_stages, fused, budget):
    with jax.enable_x64(True):
        _compare(depth, big_stages, fused, budget, dtype=np.float64, tol=1e-9)


def test_big_activations_live_in_host_memory_after_forward():
    model = BigResNet(18, big_stages=4, max_partition_bytes=20_000_000)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def embed(params):
        return nnx.merge(graphdef, params, rest)(X, train=False)

    _, pull = jax.vjp(embed, params)  # keeps every residual of the forward alive
    activations = [a for a in jax.live_arrays() if a.ndim == 4 and a.shape[0] == X.shape[0]]
    # host RAM: the host device's memory, or (on a GPU) the pinned_host buffers backing host arrays
    assert len(activations) >= 10
    assert not any(in_device_memory(a, compute_device()) for a in activations)
    assert any(a.devices() == {host_device()} or a.sharding.memory_kind == "pinned_host"
               for a in activations)
    del pull


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
