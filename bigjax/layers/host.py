"""Host ops between big layers: ReLU, max-pool, residual add, global average pool, folded BatchNorm.

The "Big-Layers" paper runs ReLU, max-pooling and residual additions on the host. Each op here is a
``jax.custom_vjp`` whose forward and backward are functions jitted on the host device of the
``Execution`` it is given: XLA:CPU runs them multi-threaded in host RAM, and nothing of their size touches the
compute device. Cotangents go back to the device each input came from, so parameters on the compute
device (the folded BatchNorm's ``a, b``) receive their gradients there.

The fused ops (``affine_relu``, ``affine_add_relu``, ``affine_relu_max_pool``) apply a folded BatchNorm
``x * a + b`` on the way: they are what the Big ResNet's fused path uses to finish a residual block in
one host pass, the BatchNorm statistics having come from the conv that produced ``x``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bigjax.layers import spill
from bigjax.layers.bands import aligned_empty, take_band
from bigjax.layers.execution import Execution, ensure_eager, zeros_like

__all__ = ["host_op", "relu", "add", "max_pool", "global_avg_pool", "affine_relu", "affine_add_relu",
           "affine_relu_max_pool", "max_pool_plain", "affine_relu_plain"]


def host_op(fn: Callable, name: str, channel_groups: int = 1, row_wise: bool = False) -> Callable:
    """Make the pure array function ``fn`` a custom_vjp op that runs jitted on the host device.

    Args:
      fn: a function of arrays only, differentiable by JAX (static settings bound with partial).
      name: the op's name, for errors.
      channel_groups: run the VJP on at least this many groups of channels, one after the other,
        for a ``fn`` that treats channels (the last axis of every argument and result)
        independently and whose pullback XLA gives large temporaries (max-pool's: ``POOL_PULL``
        times its input); more where that many groups would exceed ``max_partition_bytes``, up to
        one channel a group; 1 = at once.
      row_wise: ``fn`` is elementwise along rows (every 4-D argument and the result share images
        and rows, and a result row reads only the same row of each argument; other arguments are
        per-channel vectors): its VJP then runs in row bands (``_row_band_pull``).
    Returns:
      ``op(*arrays, execution=...)`` returning ``fn``'s result in the execution's host memory; its
      VJP runs on the host too.
    """
    forward = jax.jit(fn)

    def run(ex, args):
        ensure_eager(name, args)
        return ex.call("host_forward", forward, *map(ex.to_host, args))

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def apply(ex, *args):
        return run(ex, args)

    def apply_fwd(ex, *args):
        return run(ex, args), tuple(map(ex.keep, args))

    def apply_bwd(ex, saved, g):
        if row_wise:
            return _row_band_pull(ex, _pull(fn), saved, g)
        args = ex.restore(saved)
        spill.release(saved)  # ``args`` holds the arrays until this backward returns
        on_host = tuple(map(ex.to_host, args))
        pull = _pull(fn) if channel_groups == 1 else functools.partial(
            _grouped_pull, fn, _groups(channel_groups, on_host, ex.max_partition_bytes))
        cts = ex.call("host_backward", pull, on_host, ex.to_host(g))
        return tuple(ex.to_device_of(ct, arg) for ct, arg in zip(cts, args))

    apply.defvjp(apply_fwd, apply_bwd)

    def op(*args, execution: Execution):
        return apply(execution, *args)

    op.__name__ = op.__qualname__ = name
    return op


def _row_band_pull(ex, pull, saved, g):
    """The VJP of a row-wise op in row bands of at most ``max_partition_bytes`` (the band's rows of
    ``g``, of each 4-D residual and of its cotangent): each band's residuals cut from RAM or read
    from the spill store one band ahead (``spill.bands``), its cotangents written into preallocated
    host arrays, the per-channel cotangents summed over the bands. The backward then holds ``g``,
    the cotangents and one band, not every residual restored whole beside XLA's temporaries (issue
    21, goal 1). One band (a small activation) is the whole-array VJP."""
    g = ex.to_host(g)
    n, h = g.shape[:2]
    rowed = [i for i, v in enumerate(saved) if len(v.shape) == 4]
    row_bytes = g.nbytes // h + sum(2 * saved[i].nbytes // h for i in rowed)
    rows = max(1, min(h, ex.max_partition_bytes // max(1, row_bytes)))
    ranges = [(0, n, r0, min(h, r0 + rows)) for r0 in range(0, h, rows)]
    take = functools.partial(ex.call, "take_band", take_band)
    residuals = {i: spill.bands(ex, saved[i], ranges, take) for i in rowed}
    vectors = {i: ex.to_host(v) for i, v in enumerate(saved) if i not in residuals}
    cts = {i: aligned_empty(saved[i].shape, saved[i].dtype) for i in rowed}
    sums = {}
    for rng in ranges:
        args = tuple(ex.to_host(next(residuals[i])) if i in residuals else vectors[i]
                     for i in range(len(saved)))
        part = ex.call("host_backward", pull, args, take(g, *rng))
        for i, ct in enumerate(part):
            if i in cts:
                cts[i][:, rng[2]:rng[3]] = np.asarray(ct)
            else:
                sums[i] = ct if i not in sums else sums[i] + ct
        del args, part
    del residuals
    spill.release(saved)
    return tuple(ex.to_host(cts[i]) if i in cts else ex.to_device_of(sums[i], saved[i])
                 for i in range(len(saved)))


# XLA:CPU's max-pool pullback (select_and_scatter) keeps ~7x its input in temporaries
POOL_PULL = 7


@functools.cache
def _pull(fn):
    return jax.jit(lambda args, g: jax.vjp(fn, *args)[1](g))


@functools.partial(jax.jit, donate_argnums=0)
def _put_channels(buf, part, c0):
    # in place (the buffer donated): the groups' cotangents land in one preallocated array
    return lax.dynamic_update_slice_in_dim(buf, part.astype(buf.dtype), c0, axis=buf.ndim - 1)


@functools.partial(jax.jit, static_argnames=("c0", "c1"))
def _channels(args, c0, c1):
    return tuple(a[..., c0:c1] for a in args)


def _groups(least: int, args, budget: int) -> int:
    """Channel groups whose pullback temporaries (``POOL_PULL`` x a group's inputs) fit ``budget``."""
    nbytes = sum(a.nbytes for a in args if a.ndim == 4)
    return max(least, math.ceil(POOL_PULL * nbytes / budget))


def _grouped_pull(fn, groups, args, g):
    """``jax.vjp(fn, *args)[1](g)`` computed ``groups`` channel groups at a time, each group's
    cotangents written into preallocated arrays: XLA's temporaries are those of one group."""
    c = g.shape[-1]
    groups = min(groups, c)
    bounds = [(c * k // groups, c * (k + 1) // groups) for k in range(groups)]
    cts = zeros_like(tuple(args))
    for c0, c1 in bounds:
        part = _pull(fn)(_channels(tuple(args), c0, c1), _channels((g,), c0, c1)[0])
        start = jax.device_put(np.int32(c0), g.sharding)
        cts = tuple(_put_channels(ct, p, start) for ct, p in zip(cts, part))
    return cts


def max_pool_plain(x, window=3, stride=2, padding=1, pad_rows=None):
    """NHWC max-pool with -inf padding, as ``torch.nn.MaxPool2d`` (usable anywhere, e.g. jitted);
    ``pad_rows`` overrides the (top, bottom) padding (a row band's, inside the image or at its edge)."""
    pads = ((0, 0), pad_rows or (padding, padding), (padding, padding), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), pads)


# The folded-BatchNorm ops compute in the dtype of a, b (the parameters') and round the result to x's
# (a bfloat16 host activation stays bfloat16, ``Execution.host_dtype``); so does their pullback.

def affine_relu_plain(x, a, b):
    """``relu(x*a + b)`` in a, b's dtype, rounded to x's (usable anywhere, e.g. jitted)."""
    return jax.nn.relu(x * a + b).astype(x.dtype)


def _affine_add_relu(x, a, b, shortcut):
    return jax.nn.relu(x * a + b + shortcut).astype(x.dtype)


def _affine2_add_relu(x, a, b, s, sa, sb):
    return jax.nn.relu(x * a + b + (s * sa + sb)).astype(x.dtype)


def _global_avg_pool(x):
    """Mean over rows and columns, accumulated in at least float32 (the embedding leaves the host)."""
    return jnp.mean(x, axis=(1, 2), dtype=jnp.promote_types(x.dtype, jnp.float32))


relu = host_op(jax.nn.relu, "relu", row_wise=True)
add = host_op(jnp.add, "add", row_wise=True)
global_avg_pool = host_op(_global_avg_pool, "global_avg_pool")
affine_relu = host_op(affine_relu_plain, "affine_relu", row_wise=True)
_affine_add_relu_op = host_op(_affine_add_relu, "affine_add_relu", row_wise=True)
_affine2_add_relu_op = host_op(_affine2_add_relu, "affine_add_relu", row_wise=True)


def affine_add_relu(x, a, b, shortcut, shortcut_a=None, shortcut_b=None, *, execution: Execution):
    """``relu(x*a + b + shortcut')``: a residual block's end, with ``shortcut' = shortcut*sa + sb``
    when the shortcut is a (folded-BatchNorm) projection, else the shortcut itself."""
    if shortcut_a is None:
        return _affine_add_relu_op(x, a, b, shortcut, execution=execution)
    return _affine2_add_relu_op(x, a, b, shortcut, shortcut_a, shortcut_b, execution=execution)


@functools.cache
def _max_pool_op(window, stride, padding, affine):
    pool = functools.partial(max_pool_plain, window=window, stride=stride, padding=padding)
    fn = (lambda x, a, b: pool(affine_relu_plain(x, a, b))) if affine else pool
    # by channel groups (8, more at large sides), the step's host peak at 1024^2 (the stem's) drops
    # by ~0.4 GiB, at 2048^2 by another 0.16 GiB (docs/benchmarks.md, issue 21)
    return host_op(fn, "affine_relu_max_pool" if affine else "max_pool", channel_groups=8)


def max_pool(x, *, window=3, stride=2, padding=1, execution: Execution):
    """Max-pool on the host (default: the ResNet stem's 3x3, stride 2, padding 1)."""
    return _max_pool_op(window, stride, padding, False)(x, execution=execution)


def affine_relu_max_pool(x, a, b, *, window=3, stride=2, padding=1, execution: Execution):
    """``max_pool(relu(x*a + b))`` in one host pass: the ResNet stem after its conv's statistics."""
    return _max_pool_op(window, stride, padding, True)(x, a, b, execution=execution)
