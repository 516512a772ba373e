"""Host ops between big layers: ReLU, max-pool, residual add, global average pool, folded BatchNorm,
and the fork of a residual block's input (``fork``).

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

__all__ = ["host_op", "Pool", "relu", "add", "fork", "max_pool", "global_avg_pool", "affine_relu",
           "affine_add_relu", "affine_relu_max_pool", "max_pool_plain", "affine_relu_plain"]


@dataclass(frozen=True)
class Pool:
    """A max-pool after a row-wise op: output row ``o`` reads input rows ``[o*stride - padding,
    o*stride - padding + window)``, -inf padding outside the image (as ``max_pool_plain``)."""

    window: int = 3
    stride: int = 2
    padding: int = 1

    def __call__(self, v, pad_rows=None):
        return max_pool_plain(v, self.window, self.stride, self.padding, pad_rows)

    def outputs(self, h: int) -> int:
        return (h + 2 * self.padding - self.window) // self.stride + 1

    def reaching(self, r0: int, r1: int, h: int) -> tuple[int, int]:
        """The output rows [o0, o1) whose windows reach into input rows [r0, r1) of ``h``."""
        w, s, p = self.window, self.stride, self.padding
        return max(0, -(-(r0 + p - w + 1) // s)), min(self.outputs(h), (r1 - 1 + p) // s + 1)

    def reads(self, o0: int, o1: int, h: int):
        """The input rows [z0, z1) of ``h`` that output rows [o0, o1) read, and the (top, bottom)
        padding rows they add."""
        lo, hi = o0 * self.stride - self.padding, (o1 - 1) * self.stride - self.padding + self.window
        return (max(0, lo), min(h, hi)), (max(0, -lo), max(0, hi - h))

    def band(self, r0: int, r1: int, h: int):
        """For input rows [r0, r1) of ``h``: the output rows whose windows reach into them
        (``reaching``), the input rows those read and the padding they add (``reads``)."""
        o = self.reaching(r0, r1, h)
        return (o, *self.reads(*o, h))


def host_op(fn: Callable, name: str, pool: Pool | None = None) -> Callable:
    """Make the row-wise array function ``fn``, then ``pool`` if given, a custom_vjp op that runs
    jitted on the host device, its VJP too, in row bands (``_row_band_pull``).

    Args:
      fn: a function of arrays only, differentiable by JAX (static settings bound with partial),
        row-wise: its 4-D arguments share their shape, the others are per-channel vectors, and a row
        of its result reads the same row of each 4-D argument.
      name: the op's name, for errors.
      pool: a max-pool applied to ``fn``'s result (the ResNet stem's), or None.
    Returns:
      ``op(*arrays, execution=...)`` returning the result in the execution's host memory.
    """
    forward = jax.jit(fn if pool is None else lambda *args: pool(fn(*args)))

    def run(ex, args):
        ensure_eager(name, args)
        return ex.call("host_forward", forward, *map(ex.to_host, args))

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def apply(ex, *args):
        return run(ex, args)

    def apply_fwd(ex, *args):
        return run(ex, args), tuple(map(ex.keep, args))

    def apply_bwd(ex, saved, g):
        return _row_band_pull(ex, fn, pool, saved, g)

    apply.defvjp(apply_fwd, apply_bwd)

    def op(*args, execution: Execution):
        return apply(execution, *args)

    op.__name__ = op.__qualname__ = name
    return op


def _row_band_pull(ex, fn, pool: Pool | None, saved, g):
    """The VJP of ``fn`` (then ``pool``) in bands of its input rows (``_row_bands``). For a band, the
    output rows whose windows reach into it are pulled back through the input rows those windows
    read (cut from RAM, or read from the spill store one band ahead, ``spill.bands``) to the band's
    own rows (``_pull``): every window reaching a row is in the row's band, so the row's cotangent
    is whole there, added in the whole pullback's order (no overlap-add, as in the streamed stem,
    ``layers.stem``). The cotangents go into preallocated host arrays; the per-channel ones, of the
    band's own rows, are summed over the bands. The backward then holds ``g``, the cotangents and
    one band, not every residual restored whole beside XLA's temporaries (issue 21, goal 1)."""
    g = ex.to_host(g)
    rowed = [i for i, v in enumerate(saved) if len(v.shape) == 4]
    n = saved[rowed[0]].shape[0]
    bands = _row_bands(ex, pool, [saved[i] for i in rowed], g)
    take = functools.partial(ex.call, "take_band", take_band)
    residuals = {i: spill.bands(ex, saved[i], [(0, n, *z) for *_, z, _ in bands]) for i in rowed}
    vectors = {i: ex.to_host(v) for i, v in enumerate(saved) if i not in residuals}
    cts = {i: aligned_empty(saved[i].shape, saved[i].dtype) for i in rowed}
    sums = {}
    for (lo, hi), (o0, o1), (z0, z1), pad in bands:
        args = tuple(ex.to_host(next(residuals[i])) if i in residuals else vectors[i]
                     for i in range(len(saved)))
        pull = _pull(fn) if pool is None else _pull(fn, pool, pad, (lo - z0, hi - z0))
        part = ex.call("host_backward", pull, args, take(g, 0, n, o0, o1))
        for i, ct in enumerate(part):
            if i in cts:
                cts[i][:, lo:hi] = np.asarray(ct)
            else:
                sums[i] = ct if i not in sums else sums[i] + ct
        del args, part
    del residuals
    edges = [0, *(r for own, *_ in bands for r in own), saved[rowed[0]].shape[1]]
    for start, end in zip(edges[::2], edges[1::2]):  # rows no window reads (a window narrower
        for ct in cts.values():                       # than its stride): nothing flows back
            ct[:, start:end] = 0
    spill.release(saved)
    return tuple(ex.to_host(cts[i]) if i in cts else ex.to_device_of(sums[i], saved[i])
                 for i in range(len(saved)))


def _row_bands(ex, pool: Pool | None, residuals, g):
    """Bands ``(own rows, output rows, input rows read, padding)`` (``Pool.band``; row-wise, all
    three the band's rows), each at most ``max_partition_bytes`` with its rows of ``g``, of the
    ``residuals`` and of the pullback's temporaries; together they own every row a window reads."""
    h = residuals[0].shape[1]
    stride, temporaries = (1, 2) if pool is None else (pool.stride, POOL_PULL + 1)
    row_bytes = g.nbytes // g.shape[1] // stride + sum(temporaries * v.nbytes // h
                                                        for v in residuals)
    step = max(1, min(h, ex.max_partition_bytes // max(1, row_bytes)))
    bands = []
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        (o0, o1), (z0, z1), pad = pool.band(r0, r1, h) if pool else ((r0, r1), (r0, r1), None)
        if o0 < o1:
            bands.append(((max(r0, z0), min(r1, z1)), (o0, o1), (z0, z1), pad))
    return bands


# XLA:CPU's max-pool pullback (select_and_scatter) keeps ~7x its input in temporaries
POOL_PULL = 7


@functools.cache
def _pull(fn, pool=None, pad_rows=None, own=None):
    """``fn``'s pullback, jitted; with a ``pool``, over a band of rows with ``pad_rows``, pulled
    back through the pool to its result's ``own`` rows [start, end), then through ``fn`` from those
    rows alone, so the per-channel arguments' cotangents count the band's own rows only."""
    if pool is None:
        return jax.jit(lambda args, g: jax.vjp(fn, *args)[1](g))

    def pull(args, g):
        ct, = jax.vjp(functools.partial(pool, pad_rows=pad_rows), fn(*args))[1](g)
        mine = tuple(a[:, own[0]:own[1]] if a.ndim == 4 else a for a in args)
        return jax.vjp(fn, *mine)[1](ct[:, own[0]:own[1]])
    return jax.jit(pull)


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


relu = host_op(jax.nn.relu, "relu")
add = host_op(jnp.add, "add")
affine_relu = host_op(affine_relu_plain, "affine_relu")
_affine_add_relu_op = host_op(_affine_add_relu, "affine_add_relu")
_affine2_add_relu_op = host_op(_affine2_add_relu, "affine_add_relu")


def affine_add_relu(x, a, b, shortcut, shortcut_a=None, shortcut_b=None, *, execution: Execution):
    """``relu(x*a + b + shortcut')``: a residual block's end, with ``shortcut' = shortcut*sa + sb``
    when the shortcut is a (folded-BatchNorm) projection, else the shortcut itself."""
    if shortcut_a is None:
        return _affine_add_relu_op(x, a, b, shortcut, execution=execution)
    return _affine2_add_relu_op(x, a, b, shortcut, shortcut_a, shortcut_b, execution=execution)


@functools.cache
def _max_pool_op(window, stride, padding, affine):
    # its pullback in row bands whose temporaries fit a partition, as the channel groups before
    # them did (the stem's peak at 1024^2 ~0.4 GiB below the pullback at once, docs/benchmarks.md,
    # issue 21); a spilled input read band by band
    return host_op(affine_relu_plain if affine else _identity,
                   "affine_relu_max_pool" if affine else "max_pool", Pool(window, stride, padding))


def _identity(x):
    return x


def max_pool(x, *, window=3, stride=2, padding=1, execution: Execution):
    """Max-pool on the host (default: the ResNet stem's 3x3, stride 2, padding 1)."""
    return _max_pool_op(window, stride, padding, False)(x, execution=execution)


def affine_relu_max_pool(x, a, b, *, window=3, stride=2, padding=1, execution: Execution):
    """``max_pool(relu(x*a + b))`` in one host pass: the ResNet stem after its conv's statistics."""
    return _max_pool_op(window, stride, padding, True)(x, a, b, execution=execution)


class _Like:
    """What the global average pool's (and the fork's) pullback needs of its input: shape, dtype and
    placement. A pytree node with no children (as ``spill.Spilled``), so the residual holds no
    array."""

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fork_op(ex, x):
    return x, x


def _fork_fwd(ex, x):
    return (x, x), _Like(x)


def _fork_bwd(ex, like, cts):
    ct = ex.call("host_backward", _add_on_host, *map(ex.to_host, cts))
    return (ex.to_device_of(ct, like),)


_fork_op.defvjp(_fork_fwd, _fork_bwd)
_add_on_host = jax.jit(jnp.add)


def fork(x, *, execution: Execution):
    """``(x, x)``: a residual block's input, read by its first conv and by its shortcut, whose two
    cotangents this op's pullback adds. Left to JAX, the addition happens in its backward pass,
    whose loop keeps the last op's cotangents (``cts_out`` in ``jax._src.interpreters.ad.
    backward_pass3``) until the next op's pullback returns: the partial cotangent that was added
    stayed alive through the next block's add-and-ReLU pullback, a fourth activation of its size
    beside the incoming cotangent and the two it makes (docs/benchmarks.md, twelfth session). Here
    the last op's cotangent is the sum itself. The sum is JAX's (``a + b`` commutes bit for bit)."""
    return _fork_op(execution, x)
