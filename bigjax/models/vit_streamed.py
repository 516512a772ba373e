"""Streamed attention inside a ViT block, for token sequences longer than the device holds.

BigViT's plain block stage puts whole tiles on the device: every token of a tile and, per head, its
(L, L) attention matrix. For a region or a whole slide as one sequence that no longer fits, this block
is taken apart where attention mixes tokens (Big-Layers' outlook, Section 3.3: tiled, IO-aware attention):

    q, k, v = split(qkv(norm1(x)))                       token-wise stage "qkv"
    o = streamed_attention(q, k, v)                      bigjax.layers.attention (FlashAttention's tiling)
    y = x + ls1(proj(o));  y = y + ls2(mlp(norm2(y)))    token-wise stage "out"

Each token-wise stage is a ``jax.custom_vjp`` of the Big-Layers kind (Algorithms 1–2 of the paper, along
the token axis): its inputs stay in host memory; partitions — chunks of whole tiles, or token ranges of
one tile when a tile does not fit — go to the compute device, a jitted kernel runs the stage and the
result comes back; the backward recomputes each partition under ``jax.vjp`` (checkpointing per
partition) and accumulates the parameter cotangents on the device. The attention op keeps a block of
queries on the device while key/value blocks stream past it (online softmax, Dao et al. 2022) and has
its own blockwise backward. One budget, ``execution.max_partition_bytes``, bounds all three: the
token-wise partitions by ``token_bytes``' estimate, the attention blocks by ``attention.block_bytes``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from bigjax.layers.attention import block_bytes, streamed_attention
from bigjax.layers.execution import Execution, ensure_eager, zeros_like
from bigjax.models.vit import Block, ViTConfig

__all__ = ["streamed_block", "token_bytes", "attention_block", "token_grid"]

# token axis of each stage's inputs and outputs: tokens (N, L, D) -> 1, heads (N, h, L, hd) -> 2
_AXES = {"qkv": ((1,), (2, 2, 2)), "out": ((1, 2), (1,))}


def _run(kind: str, heads: int, parts, xs):
    if kind == "qkv":
        norm1, qkv = parts
        (x,) = xs
        n, t, d = x.shape
        y = qkv(norm1(x)).reshape(n, t, 3, heads, d // heads)  # timm's qkv layout
        return tuple(y[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    proj, ls1, norm2, mlp, ls2 = parts
    x, o = xs
    n, h, t, hd = o.shape
    x = x + _scaled(ls1, proj(o.transpose(0, 2, 1, 3).reshape(n, t, h * hd)))
    return (x + _scaled(ls2, mlp(norm2(x))),)


def _scaled(ls, x):
    return x if ls is None else ls(x)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def stage_forward(run, graphdef, kind, setting, state, x):
    """One partition of a stage: ``run(kind, setting, module, x)`` with the stage's module merged."""
    return run(kind, setting, nnx.merge(graphdef, state), x)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def stage_backward(run, graphdef, kind, setting, acc, state, x, g):
    """This partition's input cotangent, and the parameter cotangents added to ``acc``."""
    _, pull = jax.vjp(lambda s, v: run(kind, setting, nnx.merge(graphdef, s), v), state, x)
    d_state, dx = pull(g)
    return jax.tree.map(jnp.add, acc, d_state), dx


@dataclass(frozen=True)
class _Stage:
    graphdef: object
    kind: str  # "qkv" | "out"
    heads: int
    grid: tuple  # partitions (n0, n1, a, b): tiles [n0, n1), tokens [a, b)
    ex: Execution


def token_grid(n: int, length: int, tokens: int) -> tuple[tuple[int, int, int, int], ...]:
    """Partitions of ``tokens`` token rows at most: chunks of whole tiles when one fits, else token
    ranges of one tile at a time (the last range ragged)."""
    if tokens >= length:
        per = min(n, tokens // length)
        return tuple((a, min(a + per, n), 0, length) for a in range(0, n, per))
    return tuple((i, i + 1, a, min(a + tokens, length)) for i in range(n) for a in range(0, length, tokens))


@functools.partial(jax.jit, static_argnames=("sizes", "axis"))
def _slice(x, starts, *, sizes, axis):
    # dynamic starts: one executable per partition shape, not one per position
    x = lax.dynamic_slice_in_dim(x, starts[0], sizes[0], 0)
    return lax.dynamic_slice_in_dim(x, starts[1], sizes[1], axis)


def _take(ex: Execution, x, part, axis: int):
    """Tiles [n0, n1) and tokens [a, b) (on ``axis``) of host array ``x``, cut there, sent to compute."""
    n0, n1, a, b = part
    if (n0, n1, a, b) != (0, x.shape[0], 0, x.shape[axis]):
        starts = jax.device_put(np.array([n0, a], np.int32), x.sharding)  # explicit, next to x
        x = ex.call("take_band", _slice, x, starts, sizes=(n1 - n0, b - a), axis=axis)
    return ex.to_compute(x)


def _concat_grid(grid, parts, axis):
    """Partition outputs in grid order: token ranges joined within a tile chunk, then the chunks."""
    chunks, run = [], []
    for i, (part, y) in enumerate(zip(grid, parts)):
        run.append(y)
        if i + 1 == len(grid) or grid[i + 1][0] != part[0]:
            chunks.append(run[0] if len(run) == 1 else jnp.concatenate(run, axis=axis))
            run = []
    return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=0)


def _join(ex: Execution, grid, parts, axis: int):
    if len(parts) == 1:
        return parts[0]
    return ex.call("join_bands", _concat_grid, grid, parts, axis)


def _forward(stage: _Stage, state, xs):
    ex = stage.ex
    in_axes, out_axes = _AXES[stage.kind]
    on_device = jax.tree.map(ex.to_compute, state)
    outs = []
    for part in stage.grid:
        ys = ex.call("vit_forward", stage_forward, _run, stage.graphdef, stage.kind, stage.heads,
                     on_device, tuple(_take(ex, x, part, ax) for x, ax in zip(xs, in_axes)))
        outs.append(tuple(ex.to_host(y) for y in ys))
        del ys
    return tuple(_join(ex, stage.grid, [o[i] for o in outs], ax) for i, ax in enumerate(out_axes))


def _host(stage: _Stage, state, xs):
    ensure_eager(f"the streamed-attention block's {stage.kind} stage", state, xs)
    return tuple(stage.ex.to_host(x) for x in xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _token_stage(stage, state, xs):
    return _forward(stage, state, _host(stage, state, xs))


def _token_stage_fwd(stage, state, xs):
    host = _host(stage, state, xs)
    return _forward(stage, state, host), (state, xs, host)


def _token_stage_bwd(stage, res, gs):
    state, xs, host = res
    ex = stage.ex
    in_axes, out_axes = _AXES[stage.kind]
    on_device = jax.tree.map(ex.to_compute, state)
    acc, gs, dxs = zeros_like(on_device), tuple(map(ex.to_host, gs)), []
    for part in stage.grid:
        acc, d = ex.call("vit_backward", stage_backward, _run, stage.graphdef, stage.kind,
                         stage.heads, acc, on_device, tuple(_take(ex, x, part, ax) for x, ax in zip(host, in_axes)),
                         tuple(_take(ex, g, part, ax) for g, ax in zip(gs, out_axes)))
        dxs.append(tuple(map(ex.to_host, d)))
        del d
    d_state = jax.tree.map(ex.to_device_of, acc, state)
    joined = (_join(ex, stage.grid, [d[i] for d in dxs], ax) for i, ax in enumerate(in_axes))
    return d_state, tuple(ex.to_device_of(dx, x) for dx, x in zip(joined, xs))


_token_stage.defvjp(_token_stage_fwd, _token_stage_bwd)


def token_bytes(kind: str, config: ViTConfig, itemsize: int = 4) -> int:
    """Estimated device bytes of one token in a token-wise stage's backward kernel (the larger pass).

    "qkv": the input, its norm, q, k, v and their cotangents, with XLA's copies of the head layout
    (24 D floats: XLA:CPU's compiled ViT-B kernel grows by 74 KB a token, this says 74 KB); "out": the
    input, o, the projection, the second norm, the MLP's hidden activations, the output and their
    cotangents, doubled for the pullback's residuals (measured 100 KB a token, this says 123 KB).
    """
    d, hidden = config.embed_dim, int(config.embed_dim * config.mlp_ratio)
    floats = 24 * d if kind == "qkv" else 2 * (8 * d + 3 * hidden)
    return floats * itemsize


def attention_block(q_shape, budget: int) -> int:
    """The largest query/key block (tokens) whose streaming step fits ``budget`` bytes
    (``attention.block_bytes``), at most the sequence length."""
    length, d = q_shape[-2], q_shape[-1]
    if block_bytes(q_shape, d, 1, 1) > budget:
        raise ValueError(f"budget {budget:,} B is below one attention step of one query and one key "
                         f"for q {tuple(q_shape)} (needs {block_bytes(q_shape, d, 1, 1):,} B)")
    lo, hi = 1, length
    while lo < hi:  # block_bytes grows with the block: bisect for the last size that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if block_bytes(q_shape, d, mid, mid) <= budget else (lo, mid - 1)
    return lo


def _param_bytes(state) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


def _stage(kind: str, parts, xs, config: ViTConfig, ex: Execution):
    graphdef, state = nnx.split(parts)
    fixed = 3 * _param_bytes(state)  # parameters, their cotangent and its accumulator
    per_token = token_bytes(kind, config)
    if fixed + per_token > ex.max_partition_bytes:
        raise ValueError(
            f"budget {ex.max_partition_bytes:,} B is below one token of this ViT's streamed-attention "
            f"{kind} stage (needs {fixed + per_token:,} B: {fixed:,} B of parameters, "
            f"{per_token:,} B per token)")
    n, length = xs[0].shape[:2]
    grid = token_grid(n, length, (ex.max_partition_bytes - fixed) // per_token)
    return _token_stage(_Stage(graphdef, kind, config.num_heads, grid, ex), state, tuple(xs))


def streamed_block(block: Block, config: ViTConfig, x, ex: Execution):
    """``block(x)`` for tokens ``x`` (N, L, D) in host memory, each stage within ``ex``'s budget.

    Returns the block's output in host memory; differentiable (``nnx.grad``) outside ``jit`` in the
    block's parameters and in ``x``, with gradients equal to the in-memory block's up to round-off.
    """
    q, k, v = _stage("qkv", (block.norm1, block.attn.qkv), (x,), config, ex)
    size = attention_block(q.shape, ex.max_partition_bytes)
    o = streamed_attention(q, k, v, block_q=size, block_k=size, execution=ex)
    parts = (block.attn.proj, block.ls1, block.norm2, block.mlp, block.ls2)
    (y,) = _stage("out", parts, (x, o), config, ex)
    return y
