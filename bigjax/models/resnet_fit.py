"""``--big_stages=auto`` and ``--max_partition_bytes=auto``: the fewest big stages that fit the device.

The "Big-Layers" paper leaves the choice of big stages to the user ("can easily be adapted to the
particular GPU setup"); this makes it from a prediction of the device peak of one training step:

* all in memory (no Big-Layers): the input and XLA's compiled temporaries (``memory_analysis()``) of
  the whole jitted train step, plus the training state;
* stem and ``k`` stages big: what the streaming engine keeps at once — ``(1 + prefetch)`` partitions of
  ``budget`` bytes — plus the input and compiled temporaries of the jitted tail's train step (stages after ``k``, on
  the big part's output) and the training state.

The training state is the parameters, their gradients and Adam's two moments: 4 × parameter bytes.
The fewest big stages whose prediction fits ``limit`` win ("all in memory" before stage 0, the stem
alone); the budget is then the largest that fits, capped at what makes every big op a single
partition (``WHOLE_PARTITION`` × the largest big activation) and at least ``MIN_BUDGET`` (or that
cap, when smaller): a budget too small to stream efficiently makes a stage more big instead. The device's limit is its
``memory_stats()["bytes_limit"]``; a CPU has none, so the caller gives one (``--device_memory``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.errors import ArgumentParser
from bigjax.models.resnet import ResNet
from bigjax.models.resnet_paths import InMemory

__all__ = ["Fit", "choose_big_stages", "device_limit", "WHOLE_PARTITION"]

# a conv's backward holds at most 3 input- and 3 output-band buffers (``conv._footprint``), plus room
WHOLE_PARTITION = 8
# a budget below this many bytes makes partitions so small that the per-partition overhead dominates:
# more big stages with a larger budget are preferred to it (unless the whole op is smaller)
MIN_BUDGET = 8 * 2**20
STATE_COPIES = 4  # parameters, gradients, Adam's first and second moments


@dataclass(frozen=True)
class Fit:
    """What ``choose_big_stages`` picked and why (``reason`` is the log line)."""

    big_stages: int | None  # None: all in memory, no Big-Layers
    budget: int | None  # max_partition_bytes (None when all in memory)
    predicted_bytes: int
    limit_bytes: int
    reason: str


def device_limit(device: jax.Device) -> int | None:
    """The bytes a device may allocate (``memory_stats()["bytes_limit"]``), None where unknown (CPU)."""
    stats = device.memory_stats()
    return None if stats is None else stats.get("bytes_limit")


def choose_big_stages(model: ResNet, shape: tuple, limit: int, *, prefetch: int | None = 1,
                      big_stages: int | None = None, budget: int | None = None) -> Fit:
    """The fewest big stages (and the largest budget) whose predicted step peak fits ``limit``.

    Args:
      model: the encoder (its architecture and parameter sizes; nothing is run).
      shape: NHWC shape of one step's input (all tiles the encoder sees together).
      limit: device bytes the step may use.
      prefetch: the engine's partitions in flight (``Execution.prefetch``; None counts as 1).
      big_stages: fixed instead of chosen (``--max_partition_bytes=auto`` alone).
      budget: fixed instead of chosen (``--big_stages=auto`` alone).
    Raises:
      ValueError: not even the stem and all stages big fit; says what the smallest would need.
    """
    state = STATE_COPIES * _param_bytes(model)
    in_flight = 1 + (1 if prefetch is None else prefetch)
    tried = []
    if big_stages is None:
        whole = state + _step_bytes(model, shape, None)
        if whole <= limit:
            return Fit(None, None, whole, limit, _why("all in memory", whole, limit, tried))
        tried.append(("all in memory", whole))
    for k in range(4 + 1) if big_stages is None else (big_stages,):
        fixed = state + _step_bytes(model, shape, k)
        cap = WHOLE_PARTITION * _largest_big_activation(model, shape, k)
        smallest = budget if budget is not None else min(cap, MIN_BUDGET)
        b = budget if budget is not None else max(min(cap, (limit - fixed) // in_flight), 0)
        predicted = fixed + in_flight * b
        if b >= smallest and predicted <= limit:
            return Fit(k, int(b), predicted, limit,
                       _why(f"big_stages={k}, max_partition_bytes={b:,}", predicted, limit, tried))
        tried.append((f"big_stages={k}", fixed + in_flight * smallest))
    raise ValueError(f"the step does not fit {_gib(limit)} of device memory: "
                     + "; ".join(f"{what} needs {_gib(n)}" for what, n in tried))


def _why(choice, predicted, limit, tried) -> str:
    rejected = "".join(f"; {what} would need {_gib(n)}" for what, n in tried)
    return f"{choice}: predicted device peak {_gib(predicted)} of {_gib(limit)}{rejected}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _param_bytes(model) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _big_part_shapes(model, shape, k) -> list:
    """Shapes of the stem's and the first ``k`` stages' outputs (abstract evaluation, nothing runs)."""
    graph, state = nnx.split(model)

    def shapes(state, x):
        m = nnx.merge(graph, state)
        outs = [m.stem(InMemory, x, False)]
        for i in range(k):
            outs.append(m.stages(InMemory, outs[-1], i, i + 1, False))
        return outs
    return jax.eval_shape(shapes, state, jax.ShapeDtypeStruct(shape, jnp.float32))


def _largest_big_activation(model, shape, k) -> int:
    return max(math.prod(s.shape) * s.dtype.itemsize for s in _big_part_shapes(model, shape, k))


def _step_bytes(model, shape, k) -> int:
    """Input and temporaries of the jitted part's train step: the whole encoder (k None) or the stages
    after k (parameters and gradients are in the training state). Compiled once per architecture,
    device, shape and k."""
    key = (model.depth, jax.devices()[0].platform, tuple(shape), k)
    if key not in _COMPILED:
        _COMPILED[key] = _compiled_step_bytes(model, shape, k)
    return _COMPILED[key]


_COMPILED: dict[tuple, int] = {}


def _compiled_step_bytes(model, shape, k) -> int:
    graph, state = nnx.split(model)
    start = 0 if k is None else k
    x = (jax.ShapeDtypeStruct(shape, jnp.float32) if k is None
         else _big_part_shapes(model, shape, k)[-1])

    def loss(m, x):
        h = m.stem(InMemory, x, True) if k is None else x
        return jnp.sum(jnp.mean(m.stages(InMemory, h, start, 4, True), axis=(1, 2)))

    def step(state, x):
        return nnx.value_and_grad(loss)(nnx.merge(graph, state), x)

    stats = jax.jit(step).lower(state, x).compile().memory_analysis()
    return int(stats.temp_size_in_bytes) + math.prod(x.shape) * x.dtype.itemsize


def main(argv=None) -> None:
    """``python -m bigjax.models.resnet_fit --depth 18 --shape 512x256x256x3 --limits 80,24,8``:
    what ``auto`` picks for each device limit (GiB), one logged reason a line."""
    p = ArgumentParser(description=main.__doc__)
    p.add_argument("--depth", type=int, default=18, choices=(18, 34, 50))
    p.add_argument("--shape", default="512x256x256x3", help="NxHxWxC of one step's input")
    p.add_argument("--limits", default="80,24,8", help="device memory limits in GiB, comma-separated")
    a = p.parse_args(argv)
    model, shape = ResNet(a.depth, rngs=nnx.Rngs(0)), tuple(int(n) for n in a.shape.split("x"))
    for gib in (float(g) for g in a.limits.split(",")):
        try:
            print(f"ResNet-{a.depth} {a.shape} {gib:g} GiB: "
                  f"{choose_big_stages(model, shape, int(gib * 2**30)).reason}", flush=True)
        except ValueError as e:
            print(f"ResNet-{a.depth} {a.shape} {gib:g} GiB: {e}", flush=True)


if __name__ == "__main__":
    main()
