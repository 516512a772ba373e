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
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bigjax.layers import spill
from bigjax.layers.bands import aligned_empty, take_band
from bigjax.layers.execution import Execution, ensure_eager

__all__ = ["host_op", "Rows", "ROW_WISE", "relu", "add", "max_pool", "global_avg_pool", "affine_relu",
           "affine_add_relu", "affine_relu_max_pool", "max_pool_plain", "affine_relu_plain"]


@dataclass(frozen=True)
class Rows:
    """How a host op's output rows read its 4-D arguments' rows: output row ``o`` reads input rows
    ``[o*stride - padding, o*stride - padding + window)`` (the op's own padding outside the image),
    and its pullback keeps ``temporaries`` times a band of its inputs alive (XLA's temporaries and
    the band's cotangent). ``ROW_WISE`` (a row reads its own row) or a pooling window."""

    window: int = 1
    stride: int = 1
    padding: int = 0
    temporaries: int = 2

    def outputs(self, h: int) -> int:
        return (h + 2 * self.padding - self.window) // self.stride + 1

    def band(self, r0: int, r1: int, h: int):
        """For input rows [r0, r1) of ``h``: the output rows [o0, o1) whose windows reach into them,
        the input rows [z0, z1) those windows read and the (top, bottom) padding rows they add."""
        w, s, p = self.window, self.stride, self.padding
        o0 = max(0, -(-(r0 + p - w + 1) // s))
        o1 = min(self.outputs(h), (r1 - 1 + p) // s + 1)
        z0, z1 = max(0, o0 * s - p), min(h, (o1 - 1) * s - p + w)
        return (o0, o1), (z0, z1), (max(0, p - o0 * s), max(0, (o1 - 1) * s - p + w - h))


ROW_WISE = Rows()


def host_op(fn: Callable, name: str, rows: Rows | None = None) -> Callable:
    """Make the pure array function ``fn`` a custom_vjp op that runs jitted on the host device.

    Args:
      fn: a function of arrays only, differentiable by JAX (static settings bound with partial).
      name: the op's name, for errors.
      rows: how ``fn``'s output rows read its 4-D arguments (every one of the same shape, the other
        arguments per-channel vectors); its VJP then runs in row bands (``_row_band_pull``). A
        pooling window's ``fn`` takes ``pad_rows`` (a band's top and bottom padding, as
        ``max_pool_plain``). None: the VJP of the whole arrays at once.
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
        if rows is not None:
            return _row_band_pull(ex, fn, rows, saved, g)
        args = ex.restore(saved)
        spill.release(saved)  # ``args`` holds the arrays until this backward returns
        cts = ex.call("host_backward", _pull(fn), tuple(map(ex.to_host, args)), ex.to_host(g))
        return tuple(ex.to_device_of(ct, arg) for ct, arg in zip(cts, args))

    apply.defvjp(apply_fwd, apply_bwd)

    def op(*args, execution: Execution):
        return apply(execution, *args)

    op.__name__ = op.__qualname__ = name
    return op


def _row_band_pull(ex, fn, rows: Rows, saved, g):
    """The VJP of a row-local op in bands of its input rows (``_row_bands``). For a band, the output
    rows whose windows reach into it are pulled back through the input rows those windows read (cut
    from RAM, or read from the spill store one band ahead, ``spill.bands``), and the band's own rows
    of the cotangents are kept: every window reaching a row is in the row's band, so its cotangent
    is whole there, added in the whole pullback's order (no overlap-add, as in the streamed stem,
    ``layers.stem``). The cotangents go into preallocated host arrays; the per-channel ones, of the
    band's own rows (``_pull``), are summed over the bands. The backward then holds ``g``, the
    cotangents and one band, not every residual restored whole beside XLA's temporaries (issue 21,
    goal 1). One band (a small activation) is the whole-array VJP."""
    g = ex.to_host(g)
    rowed = [i for i, v in enumerate(saved) if len(v.shape) == 4]
    n = saved[rowed[0]].shape[0]
    bands = _row_bands(ex, rows, [saved[i] for i in rowed], g)
    take = functools.partial(ex.call, "take_band", take_band)
    reads = [(0, n, *z) for _, _, o, z, _ in bands if o[0] < o[1]]
    residuals = {i: spill.bands(ex, saved[i], reads, take) for i in rowed}
    vectors = {i: ex.to_host(v) for i, v in enumerate(saved) if i not in residuals}
    cts = {i: aligned_empty(saved[i].shape, saved[i].dtype) for i in rowed}
    sums = {}
    for r0, r1, (o0, o1), (z0, z1), pad in bands:
        lo, hi = (max(r0, z0), min(r1, z1)) if o0 < o1 else (r1, r1)
        for i in cts:  # rows no window reads (a window narrower than its stride) get nothing
            cts[i][:, r0:lo] = cts[i][:, hi:r1] = 0
        if lo == hi:
            continue
        args = tuple(ex.to_host(next(residuals[i])) if i in residuals else vectors[i]
                     for i in range(len(saved)))
        pull = _pull(fn) if rows == ROW_WISE else _pull(fn, pad, (lo - z0, hi - z0))
        part = ex.call("host_backward", pull, args, take(g, 0, n, o0, o1))
        for i, ct in enumerate(part):
            if i in cts:
                cts[i][:, lo:hi] = np.asarray(ct)[:, lo - z0:hi - z0]
            else:
                sums[i] = ct if i not in sums else sums[i] + ct
        del args, part
    del residuals
    spill.release(saved)
    return tuple(ex.to_host(cts[i]) if i in cts else ex.to_device_of(sums[i], saved[i])
                 for i in range(len(saved)))


def _row_bands(ex, rows: Rows, residuals, g):
    """Bands of input rows ``(r0, r1, output rows, input rows read, padding)`` (``Rows.band``), each
    at most ``max_partition_bytes`` with its rows of ``g`` and ``rows.temporaries`` times its rows of
    the ``residuals``."""
    h = residuals[0].shape[1]
    row_bytes = g.nbytes // g.shape[1] // rows.stride + sum(rows.temporaries * v.nbytes // h
                                                             for v in residuals)
    step = max(1, min(h, ex.max_partition_bytes // max(1, row_bytes)))
    return [(r0, min(h, r0 + step), *rows.band(r0, min(h, r0 + step), h))
            for r0 in range(0, h, step)]


# XLA:CPU's max-pool pullback (select_and_scatter) keeps ~7x its input in temporaries
POOL_PULL = 7


@functools.cache
def _pull(fn, pad_rows=None, own=None):
    """``fn``'s pullback, jitted. With ``pad_rows`` (a window's op, on one band of rows): its
    per-channel arguments' cotangents count the band's ``own`` rows [start, end) only, the rows it
    reads beyond them through windows it shares with its neighbours being theirs."""
    if pad_rows is None:
        return jax.jit(lambda args, g: jax.vjp(fn, *args)[1](g))

    def band(*args):
        rows = jnp.arange(next(a.shape[1] for a in args if a.ndim == 4))[None, :, None, None]
        mine = (rows >= own[0]) & (rows < own[1])
        return fn(*(a if a.ndim == 4 else jnp.where(mine, a, lax.stop_gradient(a)) for a in args),
                  pad_rows=pad_rows)
    return jax.jit(lambda args, g: jax.vjp(band, *args)[1](g))


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


relu = host_op(jax.nn.relu, "relu", ROW_WISE)
add = host_op(jnp.add, "add", ROW_WISE)
affine_relu = host_op(affine_relu_plain, "affine_relu", ROW_WISE)
_affine_add_relu_op = host_op(_affine_add_relu, "affine_add_relu", ROW_WISE)
_affine2_add_relu_op = host_op(_affine2_add_relu, "affine_add_relu", ROW_WISE)


def affine_add_relu(x, a, b, shortcut, shortcut_a=None, shortcut_b=None, *, execution: Execution):
    """``relu(x*a + b + shortcut')``: a residual block's end, with ``shortcut' = shortcut*sa + sb``
    when the shortcut is a (folded-BatchNorm) projection, else the shortcut itself."""
    if shortcut_a is None:
        return _affine_add_relu_op(x, a, b, shortcut, execution=execution)
    return _affine2_add_relu_op(x, a, b, shortcut, shortcut_a, shortcut_b, execution=execution)


@functools.cache
def _max_pool_op(window, stride, padding, affine):
    pool = functools.partial(max_pool_plain, window=window, stride=stride, padding=padding)
    fn = (lambda x, a, b, pad_rows=None: pool(affine_relu_plain(x, a, b), pad_rows=pad_rows)) \
        if affine else pool
    # in row bands whose pullback temporaries fit a partition, as the channel groups before them
    # did (the stem's peak at 1024^2 ~0.4 GiB below the pullback at once, docs/benchmarks.md,
    # issue 21); a spilled input is read band by band
    return host_op(fn, "affine_relu_max_pool" if affine else "max_pool",
                   Rows(window, stride, padding, temporaries=POOL_PULL + 1))


def max_pool(x, *, window=3, stride=2, padding=1, execution: Execution):
    """Max-pool on the host (default: the ResNet stem's 3x3, stride 2, padding 1)."""
    return _max_pool_op(window, stride, padding, False)(x, execution=execution)


def affine_relu_max_pool(x, a, b, *, window=3, stride=2, padding=1, execution: Execution):
    """``max_pool(relu(x*a + b))`` in one host pass: the ResNet stem after its conv's statistics."""
    return _max_pool_op(window, stride, padding, True)(x, a, b, execution=execution)


class _Like:
    """What the global average pool's pullback needs of its input: shape, dtype and placement. A
    pytree node with no children (as ``spill.Spilled``), so the residual holds no array."""

    def __init__(self, x):
        self.shape, self.dtype = x.shape, x.dtype
        self.sharding = x.sharding if isinstance(x, jax.Array) else None


jax.tree_util.register_pytree_node(_Like, lambda s: ((), s), lambda s, _: s)
_global_avg_pool_forward = jax.jit(_global_avg_pool)


@functools.cache
def _global_avg_pool_pull(shape, dtype):
    return jax.jit(jax.linear_transpose(_global_avg_pool, jax.ShapeDtypeStruct(shape, dtype)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _global_avg_pool_op(ex, x):
    ensure_eager("global_avg_pool", x)
    return ex.call("host_forward", _global_avg_pool_forward, ex.to_host(x))


def _global_avg_pool_fwd(ex, x):
    return _global_avg_pool_op(ex, x), _Like(x)


def _global_avg_pool_bwd(ex, like, g):
    ct, = ex.call("host_backward", _global_avg_pool_pull(like.shape, like.dtype), ex.to_host(g))
    return (ex.to_device_of(ct, like),)


_global_avg_pool_op.defvjp(_global_avg_pool_fwd, _global_avg_pool_bwd)


def global_avg_pool(x, *, execution: Execution):
    """Mean over rows and columns on the host. A linear map: its pullback (the transpose) needs only
    the input's shape, so the input is kept neither in RAM nor in the spill store for the backward
    (at 16,384² a ResNet's last activation is 0.5 GiB of float32)."""
    return _global_avg_pool_op(execution, x)
