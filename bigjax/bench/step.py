"""Time one training step (forward + backward) of a Big ResNet against the jitted in-memory twin.

Both run in one process on the same input, so the ratio is meaningful on a shared, noisy machine;
absolute seconds are not. On a CPU-only machine the timed Big step keeps its activations on the
compute device (a CPU user's setting); its bytes are counted across two CPU devices (``executions``). The Big ResNet's step runs eagerly (partition loops in Python, per-partition
kernels jitted); the twin's whole step is one ``nnx.jit`` function.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.bench.bandwidth import copy_bandwidth
from bigjax.bench.precision import narrow_host_error
from bigjax.bench.profile import KERNELS, median_seconds, profile_step
from bigjax.bench.traffic import step_traffic
from bigjax.layers.execution import Execution
from bigjax.models.resnet import BigResNet, in_memory_twin

__all__ = ["StepTiming", "PartitionCounter", "benchmark_step", "step_setup", "executions"]


@dataclass
class StepTiming:
    """Median seconds per training step, Big-Layers vs in-memory jit, and how the work was split."""

    depth: int
    shape: tuple
    budget: int
    fused: bool
    conv_partitions: int  # conv kernel calls in one forward pass, summed over layers (``PartitionCounter``)
    big_s: float
    plain_s: float
    big_peak_bytes: int | None  # compute-device peak after the Big-Layers steps (None on CPU)
    peak_bytes: int | None  # peak after both (the twin's, where it is larger)
    profile: dict | None = None  # seconds per category of one blocking Big-Layers step
    traffic: dict | None = None  # bytes each way, forward and backward, of one step (``traffic``)
    bandwidth: dict | None = None  # measured copy bytes/s, {"h2d", "d2h"} (``bandwidth``)
    host_dtype: str | None = None  # narrow host activations (``Execution.host_dtype``), or None
    precision: dict | None = None  # their gradient error (``precision.narrow_host_error``)
    engine: str = "eager"  # ``Execution.engine``

    @property
    def ratio(self) -> float:
        return self.big_s / self.plain_s

    @property
    def moved_bytes(self) -> int:
        """Bytes across host <-> compute in one step, both ways, forward and backward."""
        t = self.traffic or {}
        return sum(t.get(k, 0) for k in ("fwd_h2d", "fwd_d2h", "bwd_h2d", "bwd_d2h"))

    @property
    def floor_s(self) -> float | None:
        """Seconds the step's bytes take at the measured bandwidth: the bus-bound floor."""
        if not self.bandwidth or not self.traffic:
            return None
        t, b = self.traffic, self.bandwidth
        return ((t["fwd_h2d"] + t["bwd_h2d"]) / b["h2d"] + (t["fwd_d2h"] + t["bwd_d2h"]) / b["d2h"])

    @property
    def orchestration_share(self) -> float | None:
        """Share of the profiled step that is not kernels: copies, slicing, autodiff and Python."""
        if not self.profile:
            return None
        kernels = sum(self.profile.get(c, 0.0) for c in KERNELS)
        return 1 - kernels / self.profile["total (blocking)"]

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "moved_bytes": self.moved_bytes,
                "floor_s": self.floor_s, "orchestration_share": self.orchestration_share,
                "device": str(Execution().compute)}


class PartitionCounter:
    """An ``Execution`` observer counting forward conv kernel calls: one per partition on the eager
    engine, one per conv pass (its program) on the compiled one."""

    def __init__(self):
        self.conv_partitions = 0

    def __call__(self, event, fn, *args, **kwargs):
        self.conv_partitions += event == "conv_forward"
        return fn(*args, **kwargs)


def benchmark_step(depth: int, shape: tuple, budget: int, *, fused: bool = True, reps: int = 3,
                   seed: int = 0, profile: bool = True, prefetch: int | None = 1,
                   host_dtype: str | None = None, engine: str = "eager") -> StepTiming:
    """Median step time of ``BigResNet(depth, big_stages=4)`` and its jitted twin on one input.

    Args:
      depth: ResNet depth (18, 34, 50).
      shape: NHWC input shape, e.g. (1, 1024, 1024, 3) or (32, 256, 256, 3).
      budget: ``max_partition_bytes`` of the big layers.
      fused: the fused Big-Layers path (else the paper's separate ops).
      reps: timed steps after one warm-up step, each.
      profile: also profile one Big-Layers step (``profile.profile_step``) into ``.profile`` (the
        orchestration share).
      prefetch: the engine's in-flight partitions (``Execution.prefetch``).
      host_dtype: e.g. "bfloat16": the Big step keeps its activations in it; the result then also
        carries the gradient error against float32 storage (``.precision``).
      engine: "eager" or "compiled" (``Execution.engine``).
    """
    x, big, twin, loss = step_setup(depth, shape, seed, fused)
    bus, ex = executions(budget, prefetch, host_dtype, engine)
    big_grad = nnx.value_and_grad(loss)
    plain_step = nnx.jit(nnx.value_and_grad(loss))
    x_on = {e.host: e.to_host(x) for e in (bus, ex)}
    x_device = ex.to_compute(x)
    counter = PartitionCounter()
    big(x_on[ex.host], train=False, execution=ex.replace(observer=counter))
    big_step = lambda e: big_grad(big, x_on[e.host], e)  # noqa: E731
    big_s = median_seconds(lambda: big_step(ex), reps)
    big_peak = _peak_bytes(ex)
    breakdown = profile_step(big_step, ex) if profile else None
    traffic = step_traffic(lambda e: big(x_on[e.host], train=True, execution=e), big_step, bus)
    plain_s = median_seconds(lambda: plain_step(twin, x_device), reps)
    bw = copy_bandwidth(bus)
    precision = None if host_dtype is None else narrow_host_error(
        lambda x, e: big_grad(big, x, e)[1], lambda x: plain_step(twin, x)[1], x, ex, host_dtype)
    return StepTiming(depth, tuple(shape), budget, fused, counter.conv_partitions, big_s, plain_s,
                      big_peak, _peak_bytes(ex), breakdown, traffic, {"h2d": bw.h2d, "d2h": bw.d2h},
                      host_dtype, precision, engine)


def step_setup(depth: int, shape: tuple, seed: int = 0, fused: bool = True):
    """(input, all-big ResNet, its in-memory twin, loss) of the step the benchmarks time.

    ``loss(model, x, execution=None)`` is the mean embedding's sum: a Big model is called with
    ``execution``, the twin plainly."""
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    big = BigResNet(depth, big_stages=4, fused=fused, rngs=nnx.Rngs(seed))
    weights = jnp.ones((shape[0], big.embed_dim)) / big.embed_dim

    def loss(model, x, execution=None):
        kwargs = {} if execution is None else {"execution": execution}
        return jnp.sum(model(x, train=True, **kwargs) * weights)
    return x, big, in_memory_twin(big), loss


def executions(budget, prefetch=1, host_dtype=None, engine="eager",
               whole_blocks=True) -> tuple[Execution, Execution]:
    """The engine whose copies are counted (host memory on a distinct device) and the one timed.

    On an accelerator they are the same. On a CPU-only machine the timed engine keeps activations on
    the compute device itself, as a CPU user's run does (JAX has one CPU device by default): copies
    between two virtual CPU devices are memcpys no real deployment makes. Bytes are counted (and
    bandwidth measured) across two CPU devices, so that they are not all zero.
    """
    bus = Execution(budget, prefetch=prefetch, host_dtype=host_dtype, engine=engine,
                    whole_blocks=whole_blocks)
    if bus.compute.platform != "cpu":
        return bus, bus
    return bus, bus.replace(host=bus.compute)


def _peak_bytes(ex: Execution) -> int | None:
    stats = ex.compute.memory_stats()
    return None if stats is None else stats.get("peak_bytes_in_use")
