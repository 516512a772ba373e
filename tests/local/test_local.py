"""Local training on a tiny network of the real classes: isolation, the step, Big path, K=1.

All slow on this machine: eager gradients compile every primitive once (~1–3 min per network).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.layers import Execution
from bigjax.local import make_optimizers, module_grad, paths_for, train_step
from bigjax.models.resnet_paths import InMemory
from tests.local.helpers import LABEL, X, module_state, rel_err, tiny_network

pytestmark = pytest.mark.slow


def _joint(net, paths, plan):
    """The losses of one pass and, for each L_i alone, its gradient with respect to every parameter."""
    def loss(i):
        return lambda n: n.losses(paths, X, LABEL, plan)[i]
    values = nnx.clone(net).losses(paths, X, LABEL, plan)
    return values, [nnx.grad(loss(i))(nnx.clone(net)) for i in range(len(values))]


def _sequential(net, paths, plan):
    """The step's gradients: one module after another, each on the output of the one before."""
    h, out = net.stem(paths[0], X), []
    for m, path, (positions, patch) in zip(net.local_modules, paths, plan):
        loss, h, grads = module_grad(m, path, h, LABEL, positions, patch=patch, alpha=net.alpha)
        out.append((loss, grads))
    return out


def _all_zero(tree) -> bool:
    return all(not np.any(np.asarray(v)) for v in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def joint():
    net = tiny_network(4)
    plan = net.sample(np.random.default_rng(1), X.shape)
    return net, plan, _joint(net, paths_for(None, 4), plan)


def test_no_gradient_crosses_a_module_boundary(joint):
    net, _, (_, grads) = joint
    for i, g in enumerate(grads):
        assert _all_zero(g["conv1"]) and _all_zero(g["bn1"]), "the stem is frozen"
        for j in range(4):
            part = g["local_modules"][j]
            assert _all_zero(part) != (i == j), f"∂L_{i + 1}/∂θ_{j + 1}"


def test_step_gradients_are_the_joint_ones_one_module_at_a_time(joint):
    net, plan, (losses, grads) = joint
    for i, (loss, g) in enumerate(_sequential(nnx.clone(net), paths_for(None, 4), plan)):
        assert rel_err(loss, losses[i]) < 1e-6
        assert rel_err(g, grads[i]["local_modules"][i]) < 1e-5, f"module {i + 1}"


def test_big_path_gradients_equal_in_memory(joint):
    """Per-module Executions with budgets that cut every conv into several row bands."""
    net, plan, (losses, grads) = joint
    bands = []

    def count(event, fn, *args, **kwargs):
        bands.append(event == "take_band")
        return fn(*args, **kwargs)

    executions = [Execution(b, observer=count) for b in (30_000, 30_000, 40_000, 100_000)]
    out = _sequential(nnx.clone(net), paths_for(executions, 4), plan)
    assert sum(bands) > 40
    for i, (loss, g) in enumerate(out):
        assert rel_err(loss, losses[i]) < 1e-5
        assert rel_err(g, grads[i]["local_modules"][i]) < 1e-4, f"module {i + 1}"


def test_one_module_is_end_to_end_training():
    """K = 1: the step's gradient is that of CE(H(backbone(stem(x)))), written out here."""
    net = tiny_network(1)
    (positions, patch), = net.sample(np.random.default_rng(0), X.shape)
    twin = nnx.clone(net)
    _, _, grads = module_grad(net.local_modules[0], InMemory, net.stem(InMemory, X), LABEL,
                              positions, patch=patch)

    def end_to_end(m):
        h = jax.nn.relu(twin.bn1.plain(twin.conv1.plain(X), train=False))
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                  ((0, 0), (1, 1), (1, 1), (0, 0)))
        for block in m.blocks:
            h = block(InMemory, h, False)
        logits = m.head(InMemory, h, train=True)
        return -jax.nn.log_softmax(logits)[LABEL]

    expected = nnx.jit(nnx.grad(end_to_end))(twin.local_modules[0])
    assert net.local_modules[0].decoder is None
    assert rel_err(grads, expected) < 1e-5


def test_a_short_run_lowers_every_module_loss():
    net = tiny_network(4)
    opts = make_optimizers(net, lr_backbone=1e-3, lr_heads=1e-3)
    history = [train_step(net, opts, X, LABEL, np.random.default_rng(0)) for _ in range(8)]
    first, last = np.asarray(history[0]), np.asarray(history[-1])
    assert np.all(last < first), (first, last)


def test_accumulation_updates_every_second_slide():
    net = tiny_network(2)
    opts = make_optimizers(net, accum=2)
    before = module_state(net, 0)
    before = jax.tree.map(np.asarray, before)
    train_step(net, opts, X, LABEL, np.random.default_rng(0))
    assert rel_err(module_state(net, 0), before) == 0
    train_step(net, opts, X, LABEL, np.random.default_rng(0))
    assert rel_err(module_state(net, 0), before) > 0


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="divide the 4 pieces"):
        tiny_network(3)
    net = tiny_network(2)
    with pytest.raises(ValueError, match="one per module \\(2\\), got 3"):
        paths_for([Execution()] * 3, 2)
    with pytest.raises(ValueError, match="batch 1"):
        train_step(net, make_optimizers(net), np.concatenate([X, X]), LABEL,
                   np.random.default_rng(0))
