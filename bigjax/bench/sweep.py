"""The runtime sweep of the "Big-Layers" paper (Section 5.3): step time against input side, per setup.

Every configuration takes the same training iteration — forward, backward and an AdamW update of a
ResNet on one image of side S — and is timed (warm-up, then ``reps`` timed iterations: mean and std).
The configurations: the jitted in-memory step; Big-Layers with 0–4 big stages (fused) and the paper's
separate ops with all stages big; and the peers a user would pick instead (``bigjax.bench.peers``):
``jax.checkpoint`` per residual block and JAX's activation offload policy, both jitted.

At each side every configuration is set up and warmed up first; then the timed iterations go
round-robin over the configurations (the starting one rotating each round), so that a change of load
on a shared machine hits every configuration alike and ratios within one run stay meaningful. The
machine load (``os.getloadavg``) is recorded at the start and end of each side. Warm-up goes on past
``warmup`` iterations while an iteration still compiles (the Big-Layers step compiles new kernels in its
second iteration), so no timed iteration pays for compilation.

Memory: only one configuration's iteration is in flight at a time and its buffers are handed back to
the OS after it (``memory.release_host``), so the resident set is the configurations' parameters plus
one iteration's peak, not the sum of their peaks. A point predicted not to fit — host memory available
now (or ``host_limit_bytes``) times ``host_fraction``, or the device's limit — is skipped and marked
"predicted ...". The prediction is the largest of: activations counted from the architecture, the
jitted step's compiled memory analysis, and the configuration's measured rise of the resident set in
one iteration at the previous side scaled by the area. One that runs out of memory anyway is recorded
as such; the offload policy, where the backend cannot compile it, is marked "unsupported".
``bigjax.bench.fits`` fits each configuration's times.
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
      fewer_reps: (side, reps): sides above ``side`` get only ``reps`` timed iterations.
      host_fraction: a point whose predicted host memory exceeds this share of ``host_limit_bytes``
        is skipped.
      host_limit_bytes: the host memory a point may use; None: what is available when it starts.
      compiled_memory: also compile the jitted steps ahead of time for XLA's memory analysis (a
        second compile per point: the CPU's device-memory figure).
    """

    depth: int = 18
    sides: tuple[int, ...] = (256, 512, 1024, 2048)
    configs: tuple[str, ...] = CONFIGS
    budget: int = 32 * 2**20
    warmup: int = 1
    reps: int = 3
    fewer_reps: tuple[int, int] | None = None
    host_fraction: float = 0.6
    host_limit_bytes: int | None = None
    compiled_memory: bool = True

    def reps_at(self, side: int) -> int:
        """Timed iterations per point at ``side``."""
        if self.fewer_reps and side > self.fewer_reps[0]:
            return self.fewer_reps[1]
        return self.reps


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
    host_step_bytes: int | None = None  # largest rise of the resident set within one iteration
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
    host_step: int | None = None

    def once(self) -> float:
        """One timed iteration; its result is dropped and its freed memory handed back."""
        before = memory.host_rss_bytes()
        memory.reset_host_peak()
        start = time.perf_counter()
        jax.block_until_ready(self.iteration())
        took = time.perf_counter() - start
        peak = memory.host_peak_bytes()
        self.host_peak = max(filter(None, (self.host_peak, peak)), default=None)
        if peak and before:
            self.host_step = max(self.host_step or 0, peak - before)
        memory.release_host()
        return took


_COMPILES = [0]
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: _COMPILES.__setitem__(
        0, _COMPILES[0] + event.endswith("backend_compile_duration")))
_MAX_EXTRA_WARMUP = 3


def _oom_note(err: Exception) -> str | None:
    """The first line of an out-of-memory error, None for any other error."""
    if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err):
        return str(err).splitlines()[0][:120] if str(err) else type(err).__name__
    return None


def _point(name: str, side: int, run: _Run, cfg: SweepConfig) -> Point:
    device = run.compiled or (cfg.budget if name.startswith("big") else None)
    std = statistics.stdev(run.times) if len(run.times) > 1 else 0.0
    return Point(name, side, "ok", statistics.mean(run.times), std, device, run.host_peak,
                 run.host_step)


def _predicted(name: str, side: int, cfg: SweepConfig, previous: dict[str, Point]) -> int:
    """Host bytes one iteration of ``name`` is predicted to add at ``side`` (see the module doc)."""
    need = memory.predicted_host_bytes(cfg.depth, side)
    last = previous.get(name)
    if last and last.host_step_bytes:
        need = max(need, last.host_step_bytes * side * side // last.area)
    return need


def _too_big(need: int, cfg: SweepConfig, device_bytes: int | None = None) -> str | None:
    """The "predicted ..." note of a point that would not fit, None where it fits."""
    limit = cfg.host_fraction * (cfg.host_limit_bytes or memory.host_available_bytes())
    device_limit = memory.device_limit_bytes()
    if device_limit is None:  # CPU: the compiled step's buffers are host memory
        need = max(need, device_bytes or 0)
    elif device_bytes and device_bytes > device_limit:
        return (f"predicted {device_bytes / 2**30:.2f} GiB on the device > its "
                f"{device_limit / 2**30:.2f} GiB")
    if need > limit:
        return (f"predicted {need / 2**30:.2f} GiB of host memory > {cfg.host_fraction:.0%} of "
                f"{limit / cfg.host_fraction / 2**30:.2f} GiB available")
    return None


def measure_side(side: int, cfg: SweepConfig, tick: Callable[[int], None] = lambda n: None,
                 previous: dict[str, Point] | None = None):
    """Every configuration of ``cfg`` at one side: (points in ``cfg.configs`` order, its SideLoad).

    Set-up and warm-up per configuration, then the timed iterations round-robin, the first
    configuration of a round rotating. ``previous``: the points of the last side, by configuration
    (their measured memory scales the prediction). ``tick(n)`` is told of each n iterations done or
    given up.
    """
    start_load = os.getloadavg()
    ticked = [0]

    def count(n):
        ticked[0] += n
        tick(n)
    done: dict[str, Point] = {}
    runs: dict[str, _Run] = {}
    x = None
    for name in cfg.configs:
        reason = peers.offload_support() if name == "offload" else None
        too_big = _too_big(_predicted(name, side, cfg, previous or {}), cfg)
        if reason or too_big:
            done[name] = (Point(name, side, "unsupported", note=f"not supported on this backend: "
                                f"{reason}") if reason else Point(name, side, "skipped", note=too_big))
            continue
        if x is None:
            x = np.random.default_rng(0).normal(size=(1, side, side, 3)).astype(np.float32)
        _guarded(name, side, done, runs, lambda: _warm(name, side, cfg, x, runs, done, previous))
        count(cfg.warmup)
    for r in range(cfg.reps_at(side)):
        names = list(runs)
        for name in names[r % len(names):] + names[:r % len(names)] if names else ():
            _guarded(name, side, done, runs, lambda: runs[name].times.append(runs[name].once()))
            count(1)
    done.update({name: _point(name, side, run, cfg) for name, run in runs.items()})
    tick(max(0, (cfg.warmup + cfg.reps_at(side)) * len(cfg.configs) - ticked[0]))  # given up
    return [done[name] for name in cfg.configs], SideLoad(side, start_load, os.getloadavg(),
                                                       memory.device_peak_bytes())


def _warm(name, side, cfg, x, runs, done, previous):
    """Set up and warm up one configuration into ``runs``, or mark it skipped in ``done`` when its
    compiled memory analysis predicts it would not fit. Warm-up iterations go on (up to
    ``_MAX_EXTRA_WARMUP`` more) while one still compiles."""
    iteration, compiled = _setup(name, cfg, x)
    too_big = _too_big(_predicted(name, side, cfg, previous or {}), cfg, compiled)
    if too_big:
        done[name] = Point(name, side, "skipped", device_peak_bytes=compiled, note=too_big)
        return
    run = _Run(iteration, compiled)
    for k in range(cfg.warmup + _MAX_EXTRA_WARMUP):
        compiles = _COMPILES[0]
        run.once()
        if k + 1 >= cfg.warmup and _COMPILES[0] == compiles:
            break
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
    points, loads, previous = [], [], {}
    total = len(cfg.configs) * sum(cfg.warmup + cfg.reps_at(side) for side in cfg.sides)
    with tqdm(total=total, desc="sweep", unit="iteration", disable=not progress) as bar:
        for side in sorted(cfg.sides):
            bar.set_postfix(side=side)
            side_points, load = measure_side(side, cfg, bar.update, previous)
            previous = {p.config: p for p in side_points if p.status == "ok"}
            points += side_points
            loads.append(load)
            after_side(Sweep(list(points), list(loads)))
    return Sweep(points, loads)
