"""Where Big-Layers keep their arrays: the host device and the compute device.

Design (of the two that also run on a GPU, see DEVELOPERS.md): big activations are JAX arrays committed
to a *host device*, ``jax.devices("cpu")``, and every host op (ReLU, max-pool, residual add, the folded
BatchNorm affine) is a function jitted on that device. We chose this over numpy / ``pinned_host``
arrays because

* host ops run multi-threaded through XLA:CPU instead of single-threaded numpy;
* an array on the CPU device has an ordinary ``float32[...]`` type (a ``pinned_host`` memory kind is part
  of the JAX type, so every cotangent would have to carry it, see shared/JAX-NOTES.md);
* on a machine with only CPUs the host device can be a *distinct* virtual device
  (``jax_num_cpu_devices=2``), so tests see exactly which arrays crossed to the compute device.

The compute device is ``jax.devices()[0]`` (the GPU where there is one). On a CPU-only machine the host
device is the second CPU device when there is one, else the compute device itself (then moving between
them costs nothing, and the partitioned ops still bound what each kernel sees).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

__all__ = ["compute_device", "host_device", "to_host", "to_compute", "to_device_of", "ensure_eager"]


def compute_device() -> jax.Device:
    """The accelerator that runs the per-partition kernels: ``jax.devices()[0]``."""
    return jax.devices()[0]


def host_device() -> jax.Device:
    """The CPU device whose memory holds big activations (host RAM)."""
    compute = compute_device()
    cpus = jax.devices("cpu")
    others = [d for d in cpus if d != compute]
    return others[0] if others else cpus[0]


def to_host(x) -> jax.Array:
    """Commit ``x`` (numpy or JAX) to the host device; a no-op when it is already there.

    From an accelerator the copy is a DMA into that device's ``pinned_host`` memory, which the CPU
    device then adopts through a numpy view: 47 GB/s on an H100, where a direct ``device_put`` to the
    CPU backend ran at 0.8 GB/s (docs/benchmarks.md).
    """
    if isinstance(x, jax.Array):
        device = next(iter(x.devices()))
        if device.platform != "cpu":
            x = np.asarray(jax.device_put(x, SingleDeviceSharding(device, memory_kind="pinned_host")))
    return jax.device_put(x, host_device())


def to_compute(x) -> jax.Array:
    """Send ``x`` (a partition, a parameter) to the compute device."""
    return jax.device_put(x, compute_device())


def to_device_of(x, like) -> jax.Array:
    """Put ``x`` where ``like`` lives (numpy counts as the compute device), e.g. a cotangent."""
    if isinstance(like, jax.Array):
        return jax.device_put(x, like.sharding)
    return to_compute(x)


def ensure_eager(op: str, *arrays) -> None:
    """Raise a clear TypeError when a Big-Layers op is traced (under ``jit``, ``vmap``, ``scan``).

    The ops stream partitions in a Python loop with concrete shapes and placements, so they must run
    eagerly; ``jax.grad``/``jax.vjp``/``nnx.grad`` outside ``jit`` are fine.
    """
    for a in jax.tree.leaves(arrays):
        if isinstance(a, jax.core.Tracer):
            raise TypeError(
                f"{op} streams partitions between host and device in a Python loop and must run "
                f"eagerly; it was called on a traced value ({type(a).__name__}), i.e. under "
                "jax.jit/vmap/scan. Call it outside jit (jax.grad, jax.vjp and nnx.grad work); only "
                "the model tail after the big stages is jitted."
            )
