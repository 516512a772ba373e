"""Where a Big-Layers training step spends its time: a blocking, per-category stopwatch.

Each instrumented function is wrapped to wait for its result (``jax.block_until_ready``) and add the
elapsed time to its category; what is left of the step's wall time is host ops' backward passes, JAX's
autodiff bookkeeping and Python. Blocking removes the overlap that asynchronous dispatch gives, so the
profiled step is slower than the timed one: read the shares, not the sum.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import jax

from bigjax.layers import batchnorm, conv, host

__all__ = ["profile_step"]

# (module, attribute, category)
_WATCHED = [
    (conv, "to_compute", "host->device copies"),
    (batchnorm, "to_compute", "host->device copies"),
    (conv, "to_host", "device->host copies"),
    (batchnorm, "to_host", "device->host copies"),
    (conv, "take_band", "band slicing (host)"),
    (batchnorm, "take_band", "band slicing (host)"),
    (conv, "join_bands", "band joining (host)"),
    (batchnorm, "join_bands", "band joining (host)"),
    (conv, "_forward_kernel", "conv kernels (fwd)"),
    (conv, "_backward_kernel", "conv kernels (bwd)"),
    (conv, "_stats_cotangent", "conv kernels (bwd)"),
    (batchnorm, "_affine_kernel", "batch-norm kernels"),
    (batchnorm, "_affine_pull", "batch-norm kernels"),
    (batchnorm, "_moments_pull", "batch-norm kernels"),
    *((host, name, "host ops (fwd)") for name in (
        "relu", "add", "max_pool", "global_avg_pool", "affine_add_relu", "affine_relu_max_pool")),
]


@contextlib.contextmanager
def _stopwatch(totals):
    saved = [(module, name, getattr(module, name)) for module, name, _ in _WATCHED]
    for (module, name, category), (_, _, original) in zip(_WATCHED, saved):
        setattr(module, name, _timed(original, category, totals))
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def _timed(fn, category, totals):
    def run(*args, **kwargs):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        totals[category] += time.perf_counter() - start
        return out
    return run


def profile_step(step) -> dict[str, float]:
    """Seconds per category for one call of ``step`` (already compiled), plus the remainder."""
    totals: dict[str, float] = defaultdict(float)
    with _stopwatch(totals):
        start = time.perf_counter()
        jax.block_until_ready(step())
        wall = time.perf_counter() - start
    totals["host ops (bwd), autodiff, Python"] = wall - sum(totals.values())
    totals["total (blocking)"] = wall
    return dict(totals)
