"""Benchmarks: a training step of the Big ResNet against its jitted in-memory twin (``step``).

Importing this package asks JAX for two CPU devices (before any backend starts), so that on a machine
without an accelerator the engine's host and compute are distinct devices, as in the tests: its copies
are then real, and ``traffic`` counts them (with one device nothing crosses and every count is 0).
"""

import jax

try:
    jax.config.update("jax_num_cpu_devices", 2)
except RuntimeError:  # a backend is already running: keep its devices
    pass
