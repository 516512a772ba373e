"""Shared checks for the layer tests: relative error against an independent in-memory computation."""

import gc

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.bench.memory import device_buffer_bytes
from bigjax.layers import Execution

EX = Execution()  # the default devices (compute: CPU 0, host: CPU 1); budgets are given per test


def device_bytes_already_live() -> int:
    """The compute device's buffers before a test makes its own: what earlier tests, jax's caches or a
    failed test's kept traceback still hold (after a garbage collection, which frees the cycles an
    observer closing over its ``Execution`` makes). Device bounds are checked above this."""
    gc.collect()
    return device_buffer_bytes(EX.compute)


def rel_err(a, b) -> float:
    """max |a - b| / max |b| over all leaves (0 when both are zero)."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = (np.asarray(jax.device_get(v), np.float64) for v in (x, y))
        worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
    return worst


def grad(f, argnums=0):
    """``jax.grad(f, argnums)`` whose seed cotangent is placed explicitly.

    ``jax.grad`` makes its seed (1.0) from a Python constant, an implicit host-to-device transfer that
    ``jax.transfer_guard("disallow")`` refuses; here the seed is ``device_put`` beside the loss.
    """
    single = isinstance(argnums, int)
    nums = (argnums,) if single else tuple(argnums)

    def grads(*args):
        def of(*chosen):
            full = list(args)
            for i, v in zip(nums, chosen):
                full[i] = v
            return f(*full)

        out, pull = jax.vjp(of, *(args[i] for i in nums))
        cts = pull(jax.device_put(np.ones(out.shape, out.dtype), out.sharding))
        return cts[0] if single else cts
    return grads


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
