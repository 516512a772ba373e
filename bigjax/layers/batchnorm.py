"""Partitioned BatchNorm: the "Big-Layers" paper's two-pass algorithm (Algorithms 1–2).

Forward: pass 1 streams the input and merges per-band moments (``moments``, Chan/Welford); the small
per-channel statistics are folded into ``a = scale / sqrt(var + eps)``, ``b = bias - mean * a`` on the
device; pass 2 streams the input again and writes ``y = x * a + b`` back to host memory.

Backward, likewise two passes, one per op: the affine pass gives ``dx = g * a`` with ``da = Σ g x`` and
``db = Σ g`` reduced on the device, the statistics pass gives the part that flows through the batch
mean and variance, ``(dmean + 2 dvar (x - mean)) / M``; JAX adds the two input gradients and carries
``da, db`` back to ``scale, bias, mean, var`` through the fold. Each op is exact on its own, so the
composition equals the in-memory BatchNorm's gradient. A backward reads its residual input band by
band, from RAM or from the spill store (``spill.bands``), never whole.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.layers import moments, spill
from bigjax.layers.bands import join_on_host, take_band
from bigjax.layers.execution import Execution, ensure_eager, zeros_like
from bigjax.layers.plan import IDENTITY, Footprint, plan_partitions

__all__ = ["big_batch_norm", "big_batch_norm_inference", "big_affine", "big_moments",
           "fold_batch_norm"]


@functools.partial(jax.jit, static_argnames=("eps",))
def fold_batch_norm(scale, bias, mean, var, eps):
    """Per-channel (a, b) with ``BN(x) = x * a + b``: a = scale / sqrt(var + eps), b = bias - mean a.

    Jitted: the Big path runs it eagerly under ``jax.grad`` once per layer, where its separate small
    ops cost milliseconds in tracing alone.
    """
    a = scale * jax.lax.rsqrt(var + eps)
    return a, bias - mean * a


def _plan(x, ex, in_buffers, out_buffers):
    c = x.shape[-1]
    fp = Footprint(in_buffers, out_buffers, fixed_bytes=8 * c * x.dtype.itemsize)
    return plan_partitions(x.shape, c, IDENTITY, fp, ex.max_partition_bytes, x.dtype.itemsize,
                           "batch norm")


def _to_compute_bands(ex, in_buffers, out_buffers, x, *more):
    """Yield each partition of ``x`` (a host array, or a residual ``Execution.keep`` gave: cut from
    RAM or read from the spill store one band ahead, ``spill.bands``) and of the same-shaped host
    arrays ``more``, as device bands."""
    plan = _plan(x, ex, in_buffers, out_buffers)
    take = functools.partial(ex.call, "take_band", take_band)
    xs = spill.bands(ex, x, [(p.n0, p.n1, p.r0, p.r1) for p in plan])
    for p in plan:
        ex.window.admit(ex)
        yield p, ex.to_compute(next(xs)), *(ex.to_compute(take(v, p.n0, p.n1, p.r0, p.r1))
                                            for v in more)


def _to_host(ex, p, band):
    """(partition, its output band on its way to host memory), the band noted in flight."""
    band = ex.to_host_async(band)
    ex.window.track(band)
    return p, band


def _join(ex, bands):
    return join_on_host(ex, bands)


# --- pass 1: statistics --------------------------------------------------------------------------

_accumulate = jax.jit(moments.accumulate_moments)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _moments(ex, x):
    ensure_eager("big_batch_norm", x)
    x = ex.to_host(x)
    _plan(x, ex, 2, 0)  # the backward's footprint must fit too: fail before any work
    acc = None
    for _, xb in _to_compute_bands(ex, 1, 0, x):
        acc = ex.call("batch_norm", _accumulate, acc, xb)
        ex.window.track(acc)
        del xb
    return moments.finish_moments(acc)


def _moments_fwd(ex, x):
    x = ex.to_host(x)
    mean, var = _moments(ex, x)
    return (mean, var), (ex.keep(x), mean)


_moments_pull = jax.jit(moments.moments_cotangent)


def _moments_bwd(ex, res, cts):
    saved, mean = res
    g_mean, g_var = map(ex.to_compute, cts)
    count = ex.to_compute(np.float32(math.prod(saved.shape[:-1])))
    bands = [_to_host(ex, p, ex.call("batch_norm", _moments_pull, xb, mean, g_mean, g_var, count))
             for p, xb in _to_compute_bands(ex, 2, 0, saved)]
    spill.release(saved)
    return (_join(ex, bands),)


_moments.defvjp(_moments_fwd, _moments_bwd)


def big_moments(x, *, execution: Execution):
    """Per-channel mean and biased variance of an NHWC host array, in one streamed pass."""
    return _moments(execution, x)


# --- pass 2: normalise -----------------------------------------------------------------------------

@jax.jit
def _affine_kernel(x, a, b):
    return x * a + b


@jax.jit
def _affine_pull(acc, x, g, a):
    da, db = acc
    return (da + jnp.sum(g * x, axis=(0, 1, 2)), db + jnp.sum(g, axis=(0, 1, 2))), g * a


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _affine(ex, x, a, b):
    ensure_eager("big_batch_norm", x, a, b)
    x, a, b = ex.to_host(x), ex.to_compute(a), ex.to_compute(b)
    return _join(ex, [_to_host(ex, p, ex.call("batch_norm", _affine_kernel, xb, a, b))
                      for p, xb in _to_compute_bands(ex, 1, 1, x)])


def _affine_fwd(ex, x, a, b):
    x = ex.to_host(x)
    return _affine(ex, x, a, b), (ex.keep(x), ex.to_compute(a))


def _affine_bwd(ex, res, g):
    saved, a = res
    acc, bands = zeros_like((a, a)), []
    for p, xb, gb in _to_compute_bands(ex, 2, 1, saved, ex.to_host(g)):
        acc, dx = ex.call("batch_norm", _affine_pull, acc, xb, gb, a)
        bands.append(_to_host(ex, p, dx))
        del xb, gb, dx
    spill.release(saved)
    return (_join(ex, bands), *acc)


_affine.defvjp(_affine_fwd, _affine_bwd)


def big_affine(x, a, b, *, execution: Execution):
    """Per-channel ``x * a + b`` of an NHWC host array, streamed through the device."""
    return _affine(execution, x, a, b)


# --- the layer -------------------------------------------------------------------------------------

def big_batch_norm(x, scale, bias, *, eps=1e-5, execution: Execution):
    """Training-mode BatchNorm of an NHWC activation in host memory (two streamed passes).

    Args:
      x: (N, H, W, C), numpy or JAX; scale, bias: (C,).
      eps: added to the variance.
      execution: the compute and host devices and the partition budget.
    Returns:
      (y in host memory, batch mean (C,), batch variance (C,)) — the variance is the biased one used for
      normalising; a running-statistics update should use ``var * M / (M - 1)`` (M = N·H·W), as torch.
    """
    mean, var = big_moments(x, execution=execution)
    a, b = fold_batch_norm(execution.to_compute(scale), execution.to_compute(bias), mean, var, eps)
    return big_affine(x, a, b, execution=execution), mean, var


def big_batch_norm_inference(x, scale, bias, mean, var, *, eps=1e-5, execution: Execution):
    """Inference-mode BatchNorm with running statistics: one streamed pass."""
    ex = execution
    a, b = fold_batch_norm(*map(ex.to_compute, (scale, bias, mean, var)), eps)
    return big_affine(x, a, b, execution=ex)
