"""Chunked per-channel statistics, merged band by band on the device.

Each band's per-channel mean and sum of squared deviations (M2) are computed about one *shift* — the
first value of the first band — and merged into the running (count, mean, M2) with the pairwise update
of Chan, Golub & LeVeque (1979), the parallel form of Welford's algorithm. The merge runs on the device
inside the band's kernel, so no statistic is read back to the host inside a step (the host would block
on every band). Shifting keeps float32 exact when the mean is large compared with the spread, where
``E[x^2] - E[x]^2`` loses the digits that matter: the shifted means are of the order of the spread, so
the merge's ``delta`` terms carry no large cancellation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["accumulate_moments", "finish_moments", "moments_cotangent"]

_AXES = (0, 1, 2)  # NHWC: statistics per channel


def accumulate_moments(acc, y: jax.Array):
    """Merge band ``y``'s per-channel moments into ``acc`` = (shift, count, mean - shift, M2).

    ``acc`` None starts the accumulation (the shift is then ``y[0, 0, 0]``). Traceable: the ops call
    it inside their jitted band kernels.
    """
    n_b = y.size // y.shape[-1]
    if acc is None:
        shift, n_a, mean_a, m2_a = y[0, 0, 0], 0.0, 0.0, 0.0
    else:
        shift, n_a, mean_a, m2_a = acc
    d = y - shift
    mean_b = jnp.mean(d, axis=_AXES)
    m2_b = jnp.sum(jnp.square(d - mean_b), axis=_AXES)
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + jnp.square(delta) * (n_a * n_b / n)
    return shift, jnp.asarray(n, y.dtype), mean, m2


@jax.jit
def finish_moments(acc):
    """Per-channel (mean, biased variance) from an accumulation."""
    shift, n, mean, m2 = acc
    return shift + mean, m2 / n


def moments_cotangent(x, mean, g_mean, g_var, count):
    """Cotangent of x from its batch mean and biased variance: (dmean + 2 dvar (x - mean)) / M."""
    return (g_mean + 2.0 * g_var * (x - mean)) / count
