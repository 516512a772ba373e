"""Where a Big-Layers training step spends its time: a blocking, per-category stopwatch.

``Stopwatch`` is an ``Execution`` observer: it runs each event of the ops (copies, band slicing and
joining, kernels, host ops; ``bigjax.layers.EVENTS``), waits for its result (``jax.block_until_ready``)
and adds the elapsed time to the event's category. What is left of the step's wall time is JAX's
autodiff bookkeeping and Python. Blocking removes the overlap that asynchronous dispatch gives, so the
profiled step is slower than the timed one: read the shares, not the sum.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Callable

import jax

from bigjax.layers.execution import Execution

__all__ = ["Stopwatch", "profile_step", "median_seconds", "CATEGORIES", "KERNELS"]

CATEGORIES = {
    "to_compute": "host->device copies",
    "to_host": "device->host copies",
    "host_read": "blocking host reads",
    "wait": "waits on in-flight partitions",
    "staging": "staging copies (host memory)",
    "band_copies": "in-program copies (counted, not timed)",
    "take_band": "band slicing (host)",
    "join_bands": "band joining (host)",
    "conv_forward": "conv kernels (fwd)",
    "conv_backward": "conv kernels (bwd)",
    "batch_norm": "batch-norm kernels",
    "whole_forward": "whole-block programs (fwd)",
    "whole_backward": "whole-block programs (bwd)",
    "host_forward": "host ops (fwd)",
    "host_backward": "host ops (bwd)",
    "attention_forward": "attention kernels (fwd)",
    "attention_backward": "attention kernels (bwd)",
    "vit_forward": "ViT kernels (fwd)",
    "vit_backward": "ViT kernels (bwd)",
    "spill_write": "spill-store writes (started)",
    "spill_read": "spill-store reads (started)",
    "spill_wait": "waiting on the spill store",
    "input_read": "input-store reads (started)",
    "input_wait": "waiting on the input store",
}
REMAINDER = "autodiff, Python"
# categories that are compute (the rest of a step is orchestration: copies, slicing, Python)
KERNELS = ("conv kernels (fwd)", "conv kernels (bwd)", "batch-norm kernels",
           "whole-block programs (fwd)", "whole-block programs (bwd)", "host ops (fwd)",
           "host ops (bwd)", "attention kernels (fwd)", "attention kernels (bwd)", "ViT kernels (fwd)",
           "ViT kernels (bwd)")


class Stopwatch:
    """An observer that times every event, blocking on its result, and sums seconds per category."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self._inner = [0.0]  # seconds of events nested in the running one (a host_read in a to_host)

    def __call__(self, event: str, fn: Callable, *args, **kwargs):
        start = time.perf_counter()
        self._inner.append(0.0)
        out = jax.block_until_ready(fn(*args, **kwargs))
        elapsed = time.perf_counter() - start
        self.totals[CATEGORIES[event]] += elapsed - self._inner.pop()  # exclusive time
        self._inner[-1] += elapsed
        return out


def profile_step(step: Callable[[Execution], object], execution: Execution) -> dict[str, float]:
    """Seconds per category for one call of ``step(execution)`` (already compiled), plus the rest."""
    watch = Stopwatch()
    start = time.perf_counter()
    jax.block_until_ready(step(execution.replace(observer=watch)))
    wall = time.perf_counter() - start
    totals = dict(watch.totals)
    totals[REMAINDER] = wall - sum(totals.values())
    totals["total (blocking)"] = wall
    return totals


def median_seconds(run: Callable[[], object], reps: int,
                   clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of ``reps`` calls of ``run`` (each waited for), after one warm-up call, by
    ``clock`` (the wall clock by default)."""
    jax.block_until_ready(run())
    times = []
    for _ in range(reps):
        start = clock()
        jax.block_until_ready(run())
        times.append(clock() - start)
    return statistics.median(times)
