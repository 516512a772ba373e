"""The ResNet stem streamed in row bands: conv, BatchNorm, ReLU and max-pool, the conv's output never whole.

The stem's conv output is a step's largest activation (64 channels at half the input's side: 5.3x
the bytes of an RGB input), and the op-by-op fused path holds it whole twice: as the conv's output
(then a residual, in RAM or spilled) and, in the backward, as its cotangent from the max-pool's
pullback. At 16,384² in float32 each is 16 GiB. Here neither exists: the input (a slide's store, or a
host array) is the only residual, and every band of the conv output is recomputed from it where a pass
needs it. That is StreamingCNN's recomputation (Pinckaers et al., "Streaming convolutional neural
networks for end-to-end learning with multi-megapixel images", TPAMI 2022), with the BatchNorm's batch
statistics exact over the whole image instead of frozen:

* ``stem_moments``: one pass of conv bands merging the output's per-channel mean and biased variance
  (``moments``); its backward recomputes each band and adds the kernel gradient of the statistics'
  cotangent (``moments.moments_cotangent``).
* ``stem_pool``: ``max_pool(relu(conv(x) * a + b))``, the BatchNorm folded into ``a, b`` by
  ``BigBatchNorm.folded`` in between (running statistics and the fold stay where they are), one pass
  over bands of pooled rows. Its backward takes bands of conv rows with the rows the pooling windows
  that reach into them read, recomputes them, pulls the pooled cotangent back through the max-pool,
  the ReLU and the affine, and keeps the band's own rows for the kernel's and ``a, b``'s gradients:
  each conv row's cotangent is whole within one band, so no overlap is added.

The input is not differentiated (the image a model starts from). The price is conv work: 6 passes of
the stem's conv (2 forward, 2 recomputed, 2 kernel gradients) where the op-by-op path runs 2.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.layers import moments, spill
from bigjax.layers.bands import aligned_empty, take_band
from bigjax.layers.conv import conv2d, kernel_grad
from bigjax.layers.execution import Execution, ensure_eager, zeros_like
from bigjax.layers.host import POOL_PULL, Pool, affine_relu_plain, max_pool_plain
from bigjax.layers.plan import ConvGeometry, Footprint, Partition, plan_partitions

__all__ = ["stem_moments", "stem_pool", "POOL"]

POOL = (3, 2, 1)  # the stem's max-pool: window, stride, padding (torchvision's ResNet)


@dataclass(frozen=True)
class _Spec:
    geom: ConvGeometry
    ex: Execution


@dataclass(frozen=True)
class _Band:
    """Images [n0, n1); conv rows [z0, z1) computed, [r0, r1) of them the band's own; the input rows
    [i0, i1) they read with ``pad`` zero rows; pooled rows [o0, o1) with ``pool_pad`` -inf rows."""

    n0: int
    n1: int
    z0: int
    z1: int
    r0: int
    r1: int
    i0: int
    i1: int
    pad: tuple[int, int]
    o0: int
    o1: int
    pool_pad: tuple[int, int]


_POOL = Pool(*POOL)


def _band(geom, shape, n0, n1, r0, r1, o0, o1) -> _Band:
    """The band computing pooled rows [o0, o1) (and owning conv rows [r0, r1)) of an input of
    ``shape``: the conv rows their windows read, and the input rows those read."""
    h_in, h = shape[1], geom.out_size(*shape[1:3])[0]
    (z0, z1), pool_pad = _POOL.reads(o0, o1, h)
    i0, i1 = geom.input_rows(z0, z1)
    c0, c1 = max(i0, 0), min(i1, h_in)
    return _Band(n0, n1, z0, z1, r0, r1, c0, c1, (c0 - i0, i1 - c1), o0, o1, pool_pad)


def _forward_bands(geom, shape, plan: list[Partition]) -> list[_Band]:
    """Bands of pooled rows: each pooled row goes to the partition holding its window's centre row."""
    k, s, p = POOL
    oh = _POOL.outputs(geom.out_size(*shape[1:3])[0])
    first = [0 if q.r0 == 0 else min(oh, max(0, math.ceil((q.r0 + p - k // 2) / s))) for q in plan]
    bands = []
    for q, o0, nxt in zip(plan, first, [*first[1:], None]):
        o1 = oh if nxt is None or nxt == 0 else nxt
        if o1 > o0:
            bands.append(_band(geom, shape, q.n0, q.n1, q.r0, q.r1, o0, o1))
    return bands


def _backward_bands(geom, shape, plan: list[Partition]) -> list[_Band]:
    """Bands owning the plan's conv rows, with every pooled row whose window reads one of them."""
    h = geom.out_size(*shape[1:3])[0]
    return [_band(geom, shape, q.n0, q.n1, q.r0, q.r1, *_POOL.reaching(q.r0, q.r1, h)) for q in plan]


def _pool(v, pool_pad):
    return max_pool_plain(v, *POOL, pad_rows=pool_pad)


def _conv_band(x, kernel, geom, pad):
    """The band's conv output in the kernel's dtype (a narrower host band widened first)."""
    return conv2d(x.astype(kernel.dtype), kernel, geom, pad)


@functools.partial(jax.jit, static_argnames=("geom", "pad"))
def _moments_kernel(acc, x, kernel, *, geom, pad):
    return moments.accumulate_moments(acc, _conv_band(x, kernel, geom, pad))


@functools.partial(jax.jit, static_argnames=("geom", "pad"))
def _moments_backward_kernel(acc, x, kernel, mean, g_mean, g_var, count, *, geom, pad):
    """The kernel gradient of the band's share of the statistics' cotangent, added to ``acc``."""
    y = _conv_band(x, kernel, geom, pad).astype(x.dtype)  # as the op-by-op path keeps it
    g = moments.moments_cotangent(y, mean, g_mean, g_var, count).astype(kernel.dtype)
    return acc + kernel_grad(x.astype(kernel.dtype), g, geom, pad)


@functools.partial(jax.jit, static_argnames=("geom", "pad", "pool_pad"))
def _pool_kernel(x, kernel, a, b, *, geom, pad, pool_pad):
    z = _conv_band(x, kernel, geom, pad).astype(x.dtype)
    return _pool(affine_relu_plain(z, a, b), pool_pad)


@functools.partial(jax.jit, static_argnames=("geom", "pad", "pool_pad", "own"))
def _pool_backward_kernel(acc, x, kernel, a, b, g, *, geom, pad, pool_pad, own):
    """Gradients of kernel, a, b from the band's own conv rows ``own`` = [k0, k1), added to ``acc``."""
    z = _conv_band(x, kernel, geom, pad).astype(x.dtype)
    pre = z * a + b
    _, pull = jax.vjp(lambda v: _pool(jax.nn.relu(v).astype(z.dtype), pool_pad), pre)
    rows = jnp.arange(z.shape[1])[None, :, None, None]
    d_pre = jnp.where((rows >= own[0]) & (rows < own[1]), pull(g.astype(z.dtype))[0], 0)
    d_z = (d_pre * a).astype(x.dtype).astype(kernel.dtype)  # rounded as the host op's cotangent
    grads = (kernel_grad(x.astype(kernel.dtype), d_z, geom, pad),
             jnp.sum(d_pre * z, axis=(0, 1, 2)), jnp.sum(d_pre, axis=(0, 1, 2)))
    return jax.tree.map(jnp.add, acc, grads)


def _plan(spec, x, kernel) -> list[Partition]:
    """Row bands of the conv's output, one plan for all four passes, sized for the heaviest (the
    pool's backward: the conv band, its pre-activation, the max-pool pullback's ``POOL_PULL``
    temporaries and the conv band's cotangent). The two rows the pooling windows reach past a band's
    own on each side are not counted."""
    wide = kernel.dtype.itemsize
    narrow = x.dtype.itemsize / wide if x.dtype.itemsize < wide else 0
    fixed = 2 * (kernel.size + 8 * kernel.shape[-1]) * wide
    fp = Footprint(in_buffers=1 + narrow, out_buffers=3 + POOL_PULL, fixed_bytes=fixed)
    return plan_partitions(x.shape, kernel.shape[-1], spec.geom, fp, spec.ex.max_partition_bytes,
                           max(x.dtype.itemsize, wide), "stem")


def _place(spec, x, *params):
    """The input in host memory (a store's bands are read as used), the parameters on the device."""
    ensure_eager("stem", x, *params)
    ex = spec.ex
    return (x if isinstance(x, spill.Spilled) else ex.to_host(x), *map(ex.to_compute, params))


def _input_bands(ex, x, bands):
    """The input rows each of ``bands`` (``_Band`` or ``Partition``) reads, one band read ahead."""
    return spill.bands(ex, x, [(b.n0, b.n1, b.i0, b.i1) for b in bands])


def _count(spec, x) -> int:
    h, w = spec.geom.out_size(*x.shape[1:3])
    return x.shape[0] * h * w


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _moments(spec, x, kernel):
    return _moments_forward(spec, *_place(spec, x, kernel))


def _moments_forward(spec, x, kernel):
    ex, acc = spec.ex, None
    plan = _plan(spec, x, kernel)
    xs = _input_bands(ex, x, plan)
    for q in plan:
        ex.window.admit(ex)
        acc = ex.call("conv_forward", _moments_kernel, acc, ex.to_compute(next(xs)), kernel,
                      geom=spec.geom, pad=(q.pad_top, q.pad_bottom))
        ex.window.track(acc)
    return moments.finish_moments(acc)


def _moments_fwd(spec, x, kernel):
    x, kernel = _place(spec, x, kernel)
    mean, var = _moments_forward(spec, x, kernel)
    return (mean, var), (spec.ex.keep(x), kernel, mean)


def _moments_bwd(spec, res, cts):
    x, kernel, mean = res
    ex = spec.ex
    g_mean, g_var = map(ex.to_compute, cts)
    count = ex.to_compute(np.float32(_count(spec, x)))
    plan = _plan(spec, x, kernel)
    acc = zeros_like(kernel)
    xs = _input_bands(ex, x, plan)
    for q in plan:
        ex.window.admit(ex)
        acc = ex.call("conv_backward", _moments_backward_kernel, acc, ex.to_compute(next(xs)), kernel,
                      mean, g_mean, g_var, count, geom=spec.geom, pad=(q.pad_top, q.pad_bottom))
        ex.window.track(acc)
    del xs
    spill.release(x)
    return None, acc


_moments.defvjp(_moments_fwd, _moments_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pooled(spec, x, kernel, a, b):
    return _pool_forward(spec, *_place(spec, x, kernel, a, b))


def _pool_forward(spec, x, kernel, a, b):
    ex = spec.ex
    h, w = spec.geom.out_size(*x.shape[1:3])
    out = aligned_empty((x.shape[0], _POOL.outputs(h), _POOL.outputs(w), kernel.shape[-1]), x.dtype)
    bands = _forward_bands(spec.geom, x.shape, _plan(spec, x, kernel))
    xs = _input_bands(ex, x, bands)
    for band in bands:
        part = ex.call("conv_forward", _pool_kernel, ex.to_compute(next(xs)), kernel, a, b,
                       geom=spec.geom, pad=band.pad, pool_pad=band.pool_pad)
        out[band.n0:band.n1, band.o0:band.o1] = np.asarray(ex.to_host(part))
        del part
    return ex.to_host(out)


def _pooled_fwd(spec, x, kernel, a, b):
    placed = _place(spec, x, kernel, a, b)
    return _pool_forward(spec, *placed), (spec.ex.keep(placed[0]), *placed[1:])


def _pooled_bwd(spec, res, g):
    x, kernel, a, b = res
    ex = spec.ex
    g = ex.to_host(g)
    acc = zeros_like((kernel, a, b))
    bands = _backward_bands(spec.geom, x.shape, _plan(spec, x, kernel))
    xs = _input_bands(ex, x, bands)
    for band in bands:
        ex.window.admit(ex)
        gb = ex.to_compute(ex.call("take_band", take_band, g, band.n0, band.n1, band.o0, band.o1))
        acc = ex.call("conv_backward", _pool_backward_kernel, acc, ex.to_compute(next(xs)), kernel,
                      a, b, gb, geom=spec.geom, pad=band.pad, pool_pad=band.pool_pad,
                      own=(band.r0 - band.z0, band.r1 - band.z0))
        ex.window.track(acc)
        del gb
    del xs
    spill.release(x)
    return (None, *acc)


_pooled.defvjp(_pooled_fwd, _pooled_bwd)


def _spec(x, kernel, geom, execution) -> _Spec:
    if not isinstance(execution, Execution):
        raise TypeError(f"execution must be a bigjax.layers.Execution, got {execution!r}")
    if isinstance(x, jax.core.Tracer):
        raise TypeError("the streamed stem does not differentiate its input (a model's image); "
                        "differentiate the op-by-op stem instead")
    if kernel.shape[:2] != geom.kernel:
        raise ValueError(f"kernel {kernel.shape} does not match the geometry's {geom.kernel}")
    return _Spec(geom, execution)


def stem_moments(x, kernel, geom: ConvGeometry, *, execution: Execution):
    """Per-channel mean and biased variance of ``conv(x, kernel)``, streamed in row bands.

    Args:
      x: (N, H, W, Cin) host activation, or a store (``spill.from_store``), not differentiated.
      kernel: (KH, KW, Cin, Cout) HWIO weights, no bias (a BatchNorm follows).
      geom: the conv's stride, padding and dilation (``ConvGeometry``).
    Returns:
      (mean, var), each (Cout,), on the compute device; differentiable with respect to ``kernel``.
    """
    return _moments(_spec(x, kernel, geom, execution), x, kernel)


def stem_pool(x, kernel, a, b, geom: ConvGeometry, *, execution: Execution):
    """``max_pool(relu(conv(x, kernel) * a + b))`` (the max-pool 3x3, stride 2, padding 1), streamed
    in row bands that recompute the conv; ``a, b`` a folded BatchNorm (``BigBatchNorm.folded``).

    Returns:
      (N, OH, OW, Cout) in host memory, in ``x``'s dtype; differentiable with respect to ``kernel``,
      ``a`` and ``b``.
    """
    return _pooled(_spec(x, kernel, geom, execution), x, kernel, a, b)
