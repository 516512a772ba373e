"""Partitioned BatchNorm: the "Big-Layers" paper's two-pass algorithm (Algorithms 1–2).

Forward: pass 1 streams the input and merges per-band moments (``moments``, Chan/Welford); the small
per-channel statistics are folded into ``a = scale / sqrt(var + eps)``, ``b = bias - mean * a`` on the
device; pass 2 streams the input again and writes ``y = x * a + b`` back to host memory.

Backward, likewise two passes, one per op: the affine pass gives ``dx = g * a`` with ``da = Σ g x`` and
``db = Σ g`` reduced on the device, the statistics pass gives the part that flows through the batch
mean and variance, ``(dmean + 2 dvar (x - mean)) / M``; JAX adds the two input gradients and carries
``da, db`` back to ``scale, bias, mean, var`` through the fold. Each op is exact on its own, so the
composition equals the in-memory BatchNorm's gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bigjax.layers import moments
from bigjax.layers.bands import join_bands, take_band
from bigjax.layers.placement import ensure_eager, to_compute, to_host
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


def _plan(x, budget, in_buffers, out_buffers):
    c = x.shape[-1]
    fp = Footprint(in_buffers, out_buffers, fixed_bytes=8 * c * x.dtype.itemsize)
    return plan_partitions(x.shape, c, IDENTITY, fp, budget, x.dtype.itemsize, "batch norm")


def _to_compute_bands(budget, in_buffers, out_buffers, x, *more):
    """Yield each partition of host array ``x`` (and same-shaped ``more``) as device bands."""
    for p in _plan(x, budget, in_buffers, out_buffers):
        yield p, *(to_compute(take_band(v, p.n0, p.n1, p.r0, p.r1)) for v in (x, *more))


# --- pass 1: statistics --------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _moments(budget, x):
    ensure_eager("big_batch_norm", x)
    x = to_host(x)
    _plan(x, budget, 2, 0)  # the backward's footprint must fit too: fail before any work
    parts = [(xb.size // xb.shape[-1], *map(to_host, moments.band_moments(xb)))
             for _, xb in _to_compute_bands(budget, 1, 0, x)]
    mean, var = moments.merge_moments(parts)
    return to_compute(mean.astype(x.dtype)), to_compute(var.astype(x.dtype))


def _moments_fwd(budget, x):
    x = to_host(x)
    mean, var = _moments(budget, x)
    return (mean, var), (x, mean)


_moments_pull = jax.jit(moments.moments_cotangent)


def _moments_bwd(budget, res, cts):
    x, mean = res
    g_mean, g_var = map(to_compute, cts)
    count = x.size // x.shape[-1]
    return (join_bands([(p, to_host(_moments_pull(xb, mean, g_mean, g_var, count)))
                        for p, xb in _to_compute_bands(budget, 2, 0, x)]),)


_moments.defvjp(_moments_fwd, _moments_bwd)


def big_moments(x, *, max_partition_bytes):
    """Per-channel mean and biased variance of an NHWC host array, in one streamed pass."""
    return _moments(int(max_partition_bytes), x)


# --- pass 2: normalise -----------------------------------------------------------------------------

@jax.jit
def _affine_kernel(x, a, b):
    return x * a + b


@jax.jit
def _affine_pull(acc, x, g, a):
    da, db = acc
    return (da + jnp.sum(g * x, axis=(0, 1, 2)), db + jnp.sum(g, axis=(0, 1, 2))), g * a


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _affine(budget, x, a, b):
    ensure_eager("big_batch_norm", x, a, b)
    x, a, b = to_host(x), to_compute(a), to_compute(b)
    return join_bands([(p, to_host(_affine_kernel(xb, a, b)))
                       for p, xb in _to_compute_bands(budget, 1, 1, x)])


def _affine_fwd(budget, x, a, b):
    x = to_host(x)
    return _affine(budget, x, a, b), (x, to_compute(a))


def _affine_bwd(budget, res, g):
    x, a = res
    acc, bands = (jnp.zeros_like(a), jnp.zeros_like(a)), []
    for p, xb, gb in _to_compute_bands(budget, 2, 1, x, g):
        acc, dx = _affine_pull(acc, xb, gb, a)
        bands.append((p, to_host(dx)))
        del xb, gb, dx
    return (join_bands(bands), *acc)


_affine.defvjp(_affine_fwd, _affine_bwd)


def big_affine(x, a, b, *, max_partition_bytes):
    """Per-channel ``x * a + b`` of an NHWC host array, streamed through the device."""
    return _affine(int(max_partition_bytes), x, a, b)


# --- the layer -------------------------------------------------------------------------------------

def big_batch_norm(x, scale, bias, *, eps=1e-5, max_partition_bytes):
    """Training-mode BatchNorm of an NHWC activation in host memory (two streamed passes).

    Args:
      x: (N, H, W, C), numpy or JAX; scale, bias: (C,).
      eps: added to the variance.
      max_partition_bytes: bound on what one partition puts on the compute device.
    Returns:
      (y in host memory, batch mean (C,), batch variance (C,)) — the variance is the biased one used for
      normalising; a running-statistics update should use ``var * M / (M - 1)`` (M = N·H·W), as torch.
    """
    mean, var = big_moments(x, max_partition_bytes=max_partition_bytes)
    a, b = fold_batch_norm(scale, bias, mean, var, eps)
    return big_affine(x, a, b, max_partition_bytes=max_partition_bytes), mean, var


def big_batch_norm_inference(x, scale, bias, mean, var, *, eps=1e-5, max_partition_bytes):
    """Inference-mode BatchNorm with running statistics: one streamed pass."""
    a, b = fold_batch_norm(scale, bias, to_compute(mean), to_compute(var), eps)
    return big_affine(x, a, b, max_partition_bytes=max_partition_bytes)
