"""The runtime sweep of the "Big-Layers" paper (Section 5.3): step time against input side, per setup.

Every configuration takes the same training iteration — forward, backward and an AdamW update of a
ResNet on one image of side S — and is timed (warm-up, then ``reps`` timed iterations: mean and std).
The configurations: the jitted in-memory step; Big-Layers with 0–4 big stages (fused) and the paper's
separate ops with all stages big; and the peer a user would pick instead, ``jax.checkpoint`` per residual
block (rematerialisation, the checkpointing family of Pinckaers et al.'s streaming CNNs), jitted. A
point that is predicted not to fit host RAM is skipped and marked; a point that runs out of memory is
recorded as such. ``bigjax.bench.fits`` fits each configuration's times.
"""

from __future__ import annotations

import dataclasses
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
from bigjax.models.resnet_paths import InMemory
from bigjax.bench import memory

__all__ = ["SweepConfig", "Point", "CONFIGS", "run_sweep"]

CONFIGS = ("inmemory", "checkpoint", "big0", "big1", "big2", "big3", "big4", "big4_separate")


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
    """One (configuration, side) measurement; ``status`` is "ok", "skipped" or "oom"."""

    config: str
    side: int
    status: str
    mean_s: float | None = None
    std_s: float | None = None
    device_peak_bytes: int | None = None  # GPU: memory_stats peak; CPU: compiled memory analysis
    host_peak_bytes: int | None = None  # peak resident set size during the point
    note: str = ""

    @property
    def area(self) -> int:
        return self.side * self.side


def _adamw():
    return optax.adamw(1e-4)


def _loss(model, x, **kwargs):
    return jnp.mean(model(x, train=True, **kwargs) ** 2)


def _remat_forward(model: ResNet, x):
    """The in-memory forward with every residual block under ``nnx.remat`` (activations recomputed)."""
    x = model.stem(InMemory, x, True)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            x = nnx.remat(lambda b, h: b(InMemory, h, True))(block, x)
    return jnp.mean(x, axis=(1, 2))


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
    if name in ("inmemory", "checkpoint"):
        model = ResNet(cfg.depth, rngs=nnx.Rngs(0))
        forward = (lambda m, x: m(x, train=True)) if name == "inmemory" else _remat_forward
        optimizer = nnx.Optimizer(model, _adamw(), wrt=nnx.Param)
        step = _jitted_step(forward)
        xd = jnp.asarray(x)
        compiled = memory.compiled_bytes(step, model, optimizer, xd) if cfg.compiled_memory else None
        return (lambda: step(model, optimizer, xd)), compiled
    stages = 4 if name == "big4_separate" else int(name[3:])
    model = BigResNet(cfg.depth, big_stages=stages, fused=name != "big4_separate", rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _adamw(), wrt=nnx.Param)
    ex = Execution(cfg.budget)
    xh = ex.to_host(x)

    def iteration():
        loss, grads = nnx.value_and_grad(lambda m, x: _loss(m, x, execution=ex))(model, xh)
        _update(model, optimizer, grads)
        return loss
    return iteration, None


def measure(name: str, side: int, cfg: SweepConfig) -> Point:
    """One point: warm-up, timed iterations, memory; out-of-memory recorded, not raised."""
    need = memory.predicted_host_bytes(cfg.depth, side)
    if need > cfg.host_fraction * memory.host_ram_bytes():
        return Point(name, side, "skipped", note=f"needs ~{need / 2**30:.1f} GiB of host RAM")
    x = np.random.default_rng(0).normal(size=(1, side, side, 3)).astype(np.float32)
    memory.reset_host_peak()
    try:
        iteration, compiled = _setup(name, cfg, x)
        for _ in range(cfg.warmup):
            jax.block_until_ready(iteration())
        times = []
        for _ in range(cfg.reps):
            start = time.perf_counter()
            jax.block_until_ready(iteration())
            times.append(time.perf_counter() - start)
    except (MemoryError, jax.errors.JaxRuntimeError) as err:
        if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err):
            return Point(name, side, "oom", note=str(err).splitlines()[0][:120])
        raise
    device = memory.device_peak_bytes() or compiled or (cfg.budget if name.startswith("big") else None)
    return Point(name, side, "ok", statistics.mean(times),
                 statistics.stdev(times) if len(times) > 1 else 0.0, device, memory.host_peak_bytes())


def run_sweep(cfg: SweepConfig, progress: bool = True) -> list[Point]:
    """Every (configuration, side) point of ``cfg``, smallest sides first."""
    from tqdm import tqdm

    todo = [(name, side) for side in cfg.sides for name in cfg.configs]
    unknown = sorted(set(cfg.configs) - set(CONFIGS))
    if unknown:
        raise ValueError(f"unknown sweep configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    return [measure(name, side, cfg)
            for name, side in tqdm(todo, desc="sweep", unit="point", disable=not progress)]
