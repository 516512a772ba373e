"""Chunked per-channel statistics: band moments on the device, merged on the host.

Each partition's mean and sum of squared deviations (M2) are computed on the device, centred on the
band's own mean, and merged on the host in float64 with the pairwise update of Chan, Golub & LeVeque
(1979), the parallel form of Welford's algorithm. Centring per band keeps the variance exact when the
mean is large compared with the spread, where ``E[x^2] - E[x]^2`` in float32 cancels catastrophically.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["band_moments", "welford_merge", "merge_moments"]

_AXES = (0, 1, 2)  # NHWC: statistics per channel


@jax.jit
def band_moments(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel (mean, M2) of one NHWC band, centred on the band's mean (float32, on the device)."""
    mean = jnp.mean(y, axis=_AXES)
    return mean, jnp.sum(jnp.square(y - mean), axis=_AXES)


def welford_merge(a: tuple, b: tuple) -> tuple:
    """Merge two (count, mean, M2) triples (Chan et al. 1979); float64 numpy."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta * delta * (na * nb / n)


def merge_moments(parts: list[tuple[int, jax.Array, jax.Array]]) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-band (count, mean, M2) into the per-channel mean and biased variance (float64)."""
    total = None
    for count, mean, m2 in parts:
        triple = (float(count), np.asarray(mean, np.float64), np.asarray(m2, np.float64))
        total = triple if total is None else welford_merge(total, triple)
    n, mean, m2 = total
    return mean, m2 / n
