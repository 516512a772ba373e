"""Chunked per-channel statistics: band moments on the device, merged on the host.

Each partition's mean and sum of squared deviations (M2) are computed on the device in float32, shifted
by one of the band's own values and centred on the band's mean, and merged on the host in float64 with
the pairwise update of Chan, Golub & LeVeque (1979), the parallel form of Welford's algorithm. Shifting
and centring keep the variance exact when the mean is large compared with the spread, where
``E[x^2] - E[x]^2`` (or a float32 band mean) loses the digits that matter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["band_moments", "welford_merge", "merge_moments", "moments_cotangent"]

_AXES = (0, 1, 2)  # NHWC: statistics per channel


@jax.jit
def band_moments(y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-channel (shift, mean of y - shift, M2) of one NHWC band, on the device (float32)."""
    shift = y[0, 0, 0]
    d = y - shift
    mean = jnp.mean(d, axis=_AXES)
    return shift, mean, jnp.sum(jnp.square(d - mean), axis=_AXES)


def welford_merge(a: tuple, b: tuple) -> tuple:
    """Merge two (count, mean, M2) triples (Chan et al. 1979); float64 numpy."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta * delta * (na * nb / n)


def merge_moments(parts: list[tuple[int, jax.Array, jax.Array, jax.Array]]):
    """Merge per-band (count, shift, shifted mean, M2) into per-channel mean and biased variance."""
    total = None
    for count, *band in parts:
        shift, mean, m2 = jax.device_get(band)  # an explicit transfer (the tests disallow others)
        mean = np.asarray(shift, np.float64) + np.asarray(mean, np.float64)
        triple = (float(count), mean, np.asarray(m2, np.float64))
        total = triple if total is None else welford_merge(total, triple)
    n, mean, m2 = total
    return mean, m2 / n


def moments_cotangent(x, mean, g_mean, g_var, count):
    """Cotangent of x from its batch mean and biased variance: (dmean + 2 dvar (x - mean)) / M."""
    return (g_mean + 2.0 * g_var * (x - mean)) / count
