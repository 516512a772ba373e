"""Streamed attention equals plain softmax attention (forward and gradients) on odd lengths with blocks
small enough to force many steps, with q, k, v and the output in host memory; its kernels run on the
compute device; a budget below one step is refused in the user's terms."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.layers.attention import attention, block_bytes, streamed_attention
from bigjax.layers.execution import Execution
from tests.layers.helpers import grad

SHAPES = [((2, 3, 13, 5), (2, 3, 11, 5), 4), ((1, 17, 3), (1, 17, 3), 6)]  # q, k, dv


def _inputs(q_shape, k_shape, dv, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=q_shape).astype(np.float32)
    k = rng.normal(size=k_shape).astype(np.float32)
    v = rng.normal(size=(*k_shape[:-1], dv)).astype(np.float32)
    return q, k, v


def _reference(q, k, v):
    """softmax(q kᵀ / sqrt(d)) v in float64 numpy."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    s = np.einsum("...qd,...kd->...qk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("...qk,...kd->...qd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("q_shape,k_shape,dv,block_q,block_k", [(*SHAPES[0], 4, 3), (*SHAPES[1], 5, 2)])
def test_forward_equals_plain_attention_with_outputs_on_the_host(q_shape, k_shape, dv, block_q, block_k):
    ex = Execution()
    q, k, v = _inputs(q_shape, k_shape, dv)
    o = streamed_attention(q, k, v, block_q=block_q, block_k=block_k, execution=ex)
    assert o.devices() == {ex.host}
    np.testing.assert_allclose(np.asarray(jax.device_get(o)), _reference(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q_shape,k_shape,dv", SHAPES)
def test_gradients_equal_plain_attention(q_shape, k_shape, dv):
    ex = Execution()
    q, k, v = _inputs(q_shape, k_shape, dv, seed=1)
    w = np.random.default_rng(2).normal(size=(*q_shape[:-1], dv)).astype(np.float32)
    wc = ex.to_compute(w)
    hq, hk, hv = (ex.to_host(x) for x in (q, k, v))

    def streamed_loss(q, k, v):
        o = streamed_attention(q, k, v, block_q=3, block_k=4, execution=ex)
        return jnp.sum(jax.device_put(o, ex.compute) * wc)

    got = grad(streamed_loss, argnums=(0, 1, 2))(hq, hk, hv)
    plain = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v) * wc), argnums=(0, 1, 2)))
    want = plain(*(ex.to_compute(x) for x in (q, k, v)))
    for name, g, r in zip("qkv", got, want):
        assert g.devices() == {ex.host}, name  # cotangents go back where the inputs live
        g, r = np.asarray(jax.device_get(g)), np.asarray(jax.device_get(r))
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max(), err_msg=name)


def test_kernels_run_on_compute_blocks_stream_from_the_host():
    seen = collections.Counter()
    devices = set()

    def observer(event, fn, *args, **kwargs):
        seen[event] += 1
        out = fn(*args, **kwargs)
        if event.startswith("attention"):
            devices.update(d for leaf in jax.tree.leaves(out) for d in leaf.devices())
        return out

    ex = Execution(observer=observer)
    q, k, v = _inputs((2, 13, 4), (2, 10, 4), 4)
    streamed_attention(q, k, v, block_q=4, block_k=3, execution=ex)
    assert devices == {ex.compute} and ex.compute != ex.host
    assert seen["attention_forward"] == 4 * (1 + 4 + 1)  # per query block: start, 4 steps, finish
    assert seen["to_compute"] == 4 * (1 + 2 * 4)  # a query block, then each key and value block


def test_budget_below_one_step_is_named():
    q, k, v = _inputs((1, 2, 64, 8), (1, 2, 64, 8), 8)
    need = block_bytes(q.shape, 8, 16, 16)
    with pytest.raises(ValueError, match=f"budget 1,000 B is below one attention step of 16 queries x 16 "
                                         f"keys .* \\(needs {need:,} B\\)"):
        streamed_attention(q, k, v, block_q=16, block_k=16, execution=Execution(1000))
    with pytest.raises(ValueError, match="block_k must be a positive number of tokens, got 0"):
        streamed_attention(q, k, v, block_q=16, block_k=0, execution=Execution())
