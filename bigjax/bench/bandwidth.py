"""The bus a streaming engine is bound by: measured copy bandwidth between host memory and the device.

A fused all-big step cannot be faster than the bytes it moves divided by the bandwidth of the bus
(issue 9's floor). ``copy_bandwidth`` measures both directions the way the engine copies: host ->
compute from the host device's memory (on an accelerator, its ``pinned_host`` memory, so both
directions are DMA), compute -> host into ``pinned_host`` where the engine stages through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from bigjax.bench.profile import median_seconds
from bigjax.layers.execution import Execution

__all__ = ["Bandwidth", "copy_bandwidth"]


@dataclass(frozen=True)
class Bandwidth:
    """Bytes per second each way (median of ``reps`` copies of ``nbytes``)."""

    h2d: float
    d2h: float
    nbytes: int

    def floor_seconds(self, h2d_bytes: int, d2h_bytes: int) -> float:
        """The least time moving these bytes takes at this bandwidth (no overlap of the directions)."""
        return h2d_bytes / self.h2d + d2h_bytes / self.d2h


def copy_bandwidth(execution: Execution, nbytes: int = 256 * 2**20, reps: int = 5) -> Bandwidth:
    """Measure host -> compute and compute -> host copies of ``nbytes`` on ``execution``'s devices."""
    host_sharding = (SingleDeviceSharding(execution.compute, memory_kind="pinned_host")
                     if execution.stages_from(execution.compute)
                     else SingleDeviceSharding(execution.host))
    x = jax.device_put(np.ones(nbytes // 4, np.float32), host_sharding)
    on_device = jax.block_until_ready(jax.device_put(x, execution.compute))
    h2d = median_seconds(lambda: jax.device_put(x, execution.compute), reps)
    d2h = median_seconds(lambda: jax.device_put(on_device, host_sharding), reps)
    return Bandwidth(nbytes / h2d, nbytes / d2h, nbytes)
