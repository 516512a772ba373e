"""Shared checks for the layer tests: relative error against an independent in-memory computation."""

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.layers import Execution

EX = Execution()  # the default devices (compute: CPU 0, host: CPU 1); budgets are given per test


def rel_err(a, b) -> float:
    """max |a - b| / max |b| over all leaves (0 when both are zero)."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
    return worst


def weighted_sum_loss(fn, weights):
    """A scalar loss sum(fn(*args)[0] * weights) computed on the compute device."""
    def loss(*args):
        out = fn(*args)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(jax.device_put(out, EX.compute) * weights)
    return loss


def in_device_memory(array, device) -> bool:
    """True for arrays in ``device``'s own memory (on a GPU, not its ``pinned_host`` host memory)."""
    return device in array.devices() and array.sharding.memory_kind in (None, "device")
