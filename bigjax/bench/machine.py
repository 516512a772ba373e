"""This machine, measured: the numbers ``models.machine_fit`` predicts from, and the step it predicts.

``measure_throughput`` (FLOP/s of a conv step) and ``measure_host_bandwidth`` (bytes/s of a
memory-bound pass on the host CPU) describe a machine; ``measure_step`` runs one all-big ResNet step
and reads its peak-RSS rise (VmHWM) and time, against which the predictions are checked
(docs/benchmarks.md, "What a machine can train").
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.bench.host_memory import measure_host_step
from bigjax.bench.profile import median_seconds

__all__ = ["measure_throughput", "measure_host_bandwidth", "measure_step"]


def measure_throughput(side: int = 256, channels: int = 64, repeats: int = 3) -> float:
    """FLOP/s of a jitted 3x3 conv's forward, input and weight gradient (one ``side``² image of
    ``channels`` in and out) on the default device: the median of ``repeats`` after a compile, timed
    by ``_median_seconds``."""
    x = jnp.ones((1, side, side, channels), jnp.float32)
    w = jnp.ones((3, 3, channels, channels), jnp.float32) * 0.01

    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y * y)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return 3 * 2 * side * side * 9 * channels * channels / _median_seconds(step, (x, w), repeats)


def measure_host_bandwidth(nbytes: int = 2**28, repeats: int = 3) -> float:
    """Bytes/s of a memory-bound pass on the host CPU: a jitted ``max(x * a + b, 0)`` (the folded
    BatchNorm and ReLU of the host ops) over ``nbytes`` of float32, counting its read and its write:
    the median of ``repeats`` after a compile, timed by ``_median_seconds``."""
    cpu = jax.devices("cpu")[0]
    x, a, b = jax.device_put((np.ones(nbytes // 4, np.float32), np.float32(1.5), np.float32(-1)), cpu)
    op = jax.jit(lambda x, a, b: jnp.maximum(x * a + b, 0))
    return 2 * x.nbytes / _median_seconds(op, (x, a, b), repeats)


def _median_seconds(fn, args, repeats: int) -> float:
    """``profile.median_seconds`` of ``fn(*args)``. On a CPU-only machine by the process's CPU time
    over its cores (on a machine shared with other jobs, the wall clock measures their load too);
    with an accelerator, by the wall clock."""
    cpu = jax.devices()[0].platform == "cpu"
    clock = (lambda: time.process_time() / len(os.sched_getaffinity(0))) if cpu else time.perf_counter
    return median_seconds(lambda: fn(*args), repeats, clock)


def measure_step(depth: int, side: int, budget: int = 64 * 2**20, host_dtype: str = "float32",
                 host_memory: int | None = None, spill_dir: str | None = None) -> dict:
    """One all-big training step of ResNet-``depth`` on a ``side``² image, measured
    (``host_memory.measure_host_step``; ``host_memory`` bytes of activations kept, the rest spilled
    to ``spill_dir``): ``{"rss_rise"}`` (the peak resident set's rise over the resident set before
    the step, VmHWM - VmRSS, bytes), ``{"seconds"}``, ``{"cpu_seconds"}`` (the process's CPU time
    over the cores: on a shared machine, what the step would take alone), ``{"written"}`` and
    ``{"read"}`` (spill-store bytes)."""
    r = measure_host_step(side, budget, None if host_dtype == "float32" else host_dtype,
                          host_memory=host_memory, spill_dir=spill_dir, depth=depth)
    return {"seconds": r.step_s, "cpu_seconds": r.cpu_s, "rss_rise": r.rss_rise,
            "written": r.spilled, "read": r.read}
