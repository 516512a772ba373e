"""A module run whole as one device program (``layers.whole``) against the same module in memory under
``jax.jit``: values, gradients and running statistics; the budget decides; inputs are not copied out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.bench.memory import device_buffer_bytes
from bigjax.layers import Execution
from bigjax.layers.whole import run_whole, whole_programs
from bigjax.models.resnet import BasicBlock, Bottleneck
from bigjax.models.resnet_paths import InMemory
from tests.layers.helpers import device_bytes_already_live, rel_err

RNG = np.random.default_rng(0)


def _in_memory(block, x, *, train):
    return block(InMemory, x, train)


def _weights(shape):
    return jnp.asarray(RNG.normal(size=shape).astype(np.float32))


@pytest.mark.parametrize("block,shape,train", [
    (lambda: BasicBlock(16, 24, 2, nnx.Rngs(1)), (2, 13, 11, 16), True),  # projection shortcut
    (lambda: BasicBlock(8, 8, 1, nnx.Rngs(2)), (3, 7, 9, 8), True),
    pytest.param(lambda: Bottleneck(8, 4, 2, nnx.Rngs(3)), (2, 9, 10, 8), True,
                 marks=pytest.mark.slow),
    (lambda: BasicBlock(8, 8, 1, nnx.Rngs(4)), (1, 5, 6, 8), False),
])
def test_a_block_run_whole_equals_the_block_in_memory(block, shape, train):
    ex = Execution(10**9)
    with jax.transfer_guard("allow"):  # building a module moves its initial values
        whole, plain = block(), block()
        x = RNG.normal(size=shape).astype(np.float32)
        y_shape = jax.eval_shape(lambda m, x: m(InMemory, x, train), plain, x).shape
        w = _weights(y_shape)

    graphdef, params, rest = nnx.split(whole, nnx.Param, ...)

    def loss(params, x):
        m = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))
        y = run_whole(m, x, _in_memory, (("train", train),), ex)
        return jnp.sum(ex.to_compute(y) * w), nnx.state(m, nnx.BatchStat)

    def plain_loss(m, x):
        return jnp.sum(m(InMemory, x, train) * w)

    value, pull, stats = jax.vjp(loss, params, ex.to_host(x), has_aux=True)
    g_model, g_x = pull(jax.device_put(np.float32(1), value.sharding))
    with jax.transfer_guard("allow"):
        ref, (r_model, r_x) = nnx.jit(nnx.value_and_grad(plain_loss, argnums=(0, 1)))(plain, x)
    assert rel_err(value, ref) < 1e-6 and rel_err(g_x, r_x) < 1e-5
    assert g_x.devices() == {ex.host}
    for (path, g), (_, r) in zip(nnx.to_flat_state(g_model), nnx.to_flat_state(r_model)):
        assert rel_err(g.get_value(), r.get_value()) < 1e-5, path
    for (path, s), (_, r) in zip(nnx.to_flat_state(stats),
                                 nnx.to_flat_state(nnx.state(plain, nnx.BatchStat))):
        assert rel_err(s.get_value(), r.get_value()) < 1e-6, path


def test_the_budget_decides_from_the_compiled_programs():
    """Whole where XLA's account of the forward and backward fits the budget, else None (the
    caller streams the block op by op); the account is at least the input, output and gradient."""
    with jax.transfer_guard("allow"):
        block = BasicBlock(8, 8, 1, nnx.Rngs(0))
    x = RNG.normal(size=(2, 12, 10, 8)).astype(np.float32)
    static = (("train", True),)
    footprint = whole_programs(block, x, _in_memory, static, Execution()).footprint
    assert footprint >= 3 * x.nbytes
    assert run_whole(block, x, _in_memory, static, Execution(footprint - 1)) is None
    y = run_whole(block, x, _in_memory, static, Execution(footprint))
    assert y.shape == x.shape and y.devices() == {Execution().host}


def test_residuals_that_are_inputs_stay_out_of_the_forwards_outputs():
    """The backward takes the block's input and kernels from the op's inputs: the forward returns
    only the conv outputs (elementwise results are recomputed, ``checkpoint_dots``)."""
    with jax.transfer_guard("allow"):
        block = BasicBlock(8, 8, 1, nnx.Rngs(0))
    ex = Execution()
    x = ex.to_compute(RNG.normal(size=(2, 6, 5, 8)).astype(np.float32))
    programs = whole_programs(block, x, _in_memory, (("train", True),), ex)
    _, params, rest = nnx.split(block, nnx.Param, ...)
    _, _, kept = programs.forward(jax.tree.leaves(params), jax.tree.leaves(rest), x)
    big = [r.shape for r in kept if r.size > 8]
    assert big == [x.shape, x.shape]  # conv1's and conv2's outputs; not x, not the 3x3x8x8 kernels


def test_a_whole_block_step_keeps_the_device_within_one_budget_beyond_its_parameters():
    """At every event of a step of two whole blocks, the distinct compute-device buffers are at most
    the parameters, their gradients, the loss weights and one budget (the whole programs' own
    account); the residuals wait in host memory."""
    before = device_bytes_already_live()
    with jax.transfer_guard("allow"):
        blocks = nnx.List([BasicBlock(8, 16, 2, nnx.Rngs(0)), BasicBlock(16, 16, 1, nnx.Rngs(1))])
        weights = _weights((2, 10, 9, 16))
    x = RNG.normal(size=(2, 19, 17, 8)).astype(np.float32)
    static = (("train", True),)
    budget = max(whole_programs(b, jax.ShapeDtypeStruct(s, np.float32), _in_memory, static,
                                Execution()).footprint
                 for b, s in zip(blocks, [x.shape, (2, 10, 9, 16)]))
    seen = []

    def observer(event, fn, *args, **kwargs):
        seen.append(device_buffer_bytes(Execution().compute))
        return fn(*args, **kwargs)

    ex = Execution(budget, observer=observer)
    graphdef, params, rest = nnx.split(blocks, nnx.Param, ...)

    def loss(params):
        m = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))
        h = x
        for block in m:
            h = run_whole(block, h, _in_memory, static, ex)
            assert h is not None  # each block fits its budget
        return jnp.sum(ex.to_compute(h) * weights)

    value, pull = jax.vjp(loss, params)
    pull(jax.device_put(np.float32(1), value.sharding))
    fixed = 2 * sum(a.nbytes for a in jax.tree.leaves(params)) + weights.nbytes
    assert len(seen) > 10 and max(seen) - before <= fixed + budget

