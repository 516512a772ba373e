"""The runtime sweep of the "Big-Layers" paper (Section 5.3): step time against input side, per setup.

Every configuration takes the same training iteration — forward, backward and an AdamW update of a
ResNet on one image of side S — and is timed (warm-up, then ``reps`` timed iterations: mean and std).
The configurations: the jitted in-memory step; Big-Layers with 0–4 big stages (fused) and the paper's
separate ops with all stages big; and the peers a user would pick instead (``bigjax.bench.peers``):
``jax.checkpoint`` per residual block and JAX's activation offload policy, both jitted.

At each side every configuration is set up and warmed up first; then the timed iterations go
round-robin over the configurations (the starting one rotating each round), so that a change of load
on a shared machine hits every configuration alike and ratios within one run stay meaningful. The
machine load (``os.getloadavg``) is recorded at the start and end of each side. A point that is
predicted not to fit host RAM is skipped and marked; one that runs out of memory is recorded as such;
the offload policy, where the backend cannot compile it, is marked "unsupported". ``bigjax.bench.fits``
fits each configuration's times.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bigjax.layers.execution import Execution
from bigjax.models.resnet import BigResNet, ResNet
from bigjax.bench import memory, peers

__all__ = ["SweepConfig", "Point", "SideLoad", "Sweep", "CONFIGS", "run_sweep"]

CONFIGS = ("inmemory", "checkpoint", "offload", "big0", "big1", "big2", "big3", "big4",
           "big4_separate")
_JITTED = {"inmemory": lambda m, x: m(x, train=True), "checkpoint": peers.remat_forward,
           "offload": peers.offload_forward}


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What to sweep.

    Attributes:
      depth: ResNet depth.
      sides: input sides (one S x S RGB image per iteration).
      configs: names from ``CONFIGS``.
      budget: Big-Layers partition budget (bytes).
      warmup, reps: untimed and timed iterations per point.
      host_fraction: a point whose predicted host memory exceeds this share of RAM is skipped.
      compiled_memory: also compile the jitted steps ahead of time for XLA's memory analysis (a
        second compile per point: the CPU's device-memory figure).
    """

    depth: int = 18
    sides: tuple[int, ...] = (256, 512, 1024, 2048)
    configs: tuple[str, ...] = CONFIGS
    budget: int = 32 * 2**20
    warmup: int = 1
    reps: int = 3
    host_fraction: float = 0.6
    compiled_memory: bool = True


@dataclasses.dataclass
class Point:
    """One (configuration, side) measurement; ``status`` is "ok", "skipped", "oom" or "unsupported"."""

    config: str
    side: int
    status: str
    mean_s: float | None = None
    std_s: float | None = None
    device_peak_bytes: int | None = None  # jitted: XLA's memory analysis; Big: the partition budget
    host_peak_bytes: int | None = None  # peak resident set size during the point's iterations
    note: str = ""

    @property
    def area(self) -> int:
        return self.side * self.side


@dataclasses.dataclass(frozen=True)
class SideLoad:
    """The machine's load averages (1, 5, 15 min) when one side's measurements started and ended,
    and the device's peak bytes in use since the process started (a GPU's ``memory_stats``; None on a
    CPU) — over every configuration so far, since JAX cannot reset the peak between them."""

    side: int
    start: tuple[float, float, float]
    end: tuple[float, float, float]
    device_peak_bytes: int | None = None


@dataclasses.dataclass
class Sweep:
    """A sweep's points (sides in order, configurations in order within a side) and loads per side."""

    points: list[Point]
    loads: list[SideLoad]


def _adamw():
    return optax.adamw(1e-4)


def _jitted_step(forward: Callable):
    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m, x: jnp.mean(forward(m, x) ** 2))(model, x)
        optimizer.update(model, grads)
        return loss
    return step


@nnx.jit
def _update(model, optimizer, grads):
    optimizer.update(model, grads)


def _setup(name: str, cfg: SweepConfig, x: np.ndarray):
    """(iteration thunk, compiled device bytes or None) of one configuration."""
    if name in _JITTED:
        model = ResNet(cfg.depth, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, _adamw(), wrt=nnx.Param)
        step = _jitted_step(_JITTED[name])
        xd = jnp.asarray(x)
        compiled = memory.compiled_bytes(step, model, optimizer, xd) if cfg.compiled_memory else None
        return (lambda: step(model, optimizer, xd)), compiled
    stages = 4 if name == "big4_separate" else int(name[3:])
    model = BigResNet(cfg.depth, big_stages=stages, fused=name != "big4_separate", rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _adamw(), wrt=nnx.Param)
    ex = Execution(cfg.budget)
    xh = ex.to_host(x)

    def iteration():
        loss, grads = nnx.value_and_grad(
            lambda m, x: jnp.mean(m(x, train=True, execution=ex) ** 2))(model, xh)
        _update(model, optimizer, grads)
        return loss
    return iteration, None


@dataclasses.dataclass
class _Run:
    """One configuration's iteration at one side, its times and its host peak so far."""

    iteration: Callable
    compiled: int | None
    times: list[float] = dataclasses.field(default_factory=list)
    host_peak: int | None = None

    def once(self) -> float:
        memory.reset_host_peak()
        start = time.perf_counter()
        jax.block_until_ready(self.iteration())
        took = time.perf_counter() - start
        self.host_peak = max(filter(None, (self.host_peak, memory.host_peak_bytes())), default=None)
        return took


def _oom_note(err: Exception) -> str | None:
    """The first line of an out-of-memory error, None for any other error."""
    if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err):
        return str(err).splitlines()[0][:120] if str(err) else type(err).__name__
    return None


def _point(name: str, side: int, run: _Run, cfg: SweepConfig) -> Point:
    device = run.compiled or (cfg.budget if name.startswith("big") else None)
    std = statistics.stdev(run.times) if len(run.times) > 1 else 0.0
    return Point(name, side, "ok", statistics.mean(run.times), std, device, run.host_peak)


def measure_side(side: int, cfg: SweepConfig, tick: Callable[[int], None] = lambda n: None):
    """Every configuration of ``cfg`` at one side: (points in ``cfg.configs`` order, its SideLoad).

    Set-up and warm-up per configuration, then the timed iterations round-robin, the first
    configuration of a round rotating. ``tick(n)`` is told of each n iterations done or given up.
    """
    start_load = os.getloadavg()
    ticked = [0]

    def count(n):
        ticked[0] += n
        tick(n)
    done: dict[str, Point] = {}
    runs: dict[str, _Run] = {}
    need = memory.predicted_host_bytes(cfg.depth, side)
    if need > cfg.host_fraction * memory.host_ram_bytes():
        note = f"needs ~{need / 2**30:.1f} GiB of host RAM"
        done = {name: Point(name, side, "skipped", note=note) for name in cfg.configs}
    else:
        x = np.random.default_rng(0).normal(size=(1, side, side, 3)).astype(np.float32)
        for name in cfg.configs:
            reason = peers.offload_support() if name == "offload" else None
            if reason:
                done[name] = Point(name, side, "unsupported",
                                   note=f"not supported on this backend: {reason}")
                continue
            _guarded(name, side, done, runs, lambda: _warm(name, cfg, x, runs))
            count(cfg.warmup)
        for r in range(cfg.reps):
            names = list(runs)
            for name in names[r % len(names):] + names[:r % len(names)] if names else ():
                _guarded(name, side, done, runs, lambda: runs[name].times.append(runs[name].once()))
                count(1)
    done.update({name: _point(name, side, run, cfg) for name, run in runs.items()})
    tick((cfg.warmup + cfg.reps) * len(cfg.configs) - ticked[0])  # those given up
    return [done[name] for name in cfg.configs], SideLoad(side, start_load, os.getloadavg(),
                                                       memory.device_peak_bytes())


def _warm(name, cfg, x, runs):
    iteration, compiled = _setup(name, cfg, x)
    run = _Run(iteration, compiled)
    for _ in range(cfg.warmup):
        run.once()
    runs[name] = run


def _guarded(name, side, done, runs, work):
    """Run ``work``; an out-of-memory ends the configuration's point as "oom" instead of raising."""
    try:
        work()
    except (MemoryError, jax.errors.JaxRuntimeError) as err:
        note = _oom_note(err)
        if note is None:
            raise
        runs.pop(name, None)
        done[name] = Point(name, side, "oom", note=note)


def run_sweep(cfg: SweepConfig, progress: bool = True,
              after_side: Callable[[Sweep], None] = lambda sweep: None) -> Sweep:
    """Every (configuration, side) point of ``cfg``, smallest sides first, with the loads per side.

    ``after_side`` sees the sweep so far after each side (to save partial results of a long run).
    """
    from tqdm import tqdm

    unknown = sorted(set(cfg.configs) - set(CONFIGS))
    if unknown:
        raise ValueError(f"unknown sweep configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    points, loads = [], []
    total = len(cfg.sides) * len(cfg.configs) * (cfg.warmup + cfg.reps)
    with tqdm(total=total, desc="sweep", unit="iteration", disable=not progress) as bar:
        for side in sorted(cfg.sides):
            bar.set_postfix(side=side)
            side_points, load = measure_side(side, cfg, bar.update)
            points += side_points
            loads.append(load)
            after_side(Sweep(list(points), list(loads)))
    return Sweep(points, loads)
