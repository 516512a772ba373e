"""Paired timing: steps of several configurations interleaved, ratios taken pair by pair.

On a shared machine the load changes from one minute to the next, so two configurations timed one after
the other (``benchmark_step`` per engine) can differ by 2x for no reason of their own. Here each round
times one step of every configuration back to back, and a ratio is the median over rounds of the
per-round ratio: slow minutes slow both sides of a pair.

    python -m bigjax.bench.paired --shape 1x1024x1024x3 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import jax
from flax import nnx

from bigjax.bench.step import executions, step_setup
from bigjax.errors import ArgumentParser, run_cli
from bigjax.layers.execution import ENGINES

__all__ = ["paired_seconds", "engine_steps"]


def paired_seconds(steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each step per round, after two untimed calls of each: a jitted step whose model
    state was uncommitted arrays compiles again once its updated state is committed."""
    for step in steps.values():
        jax.block_until_ready(step())
        jax.block_until_ready(step())
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step())
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``a``'s time over ``b``'s."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


# the configurations timed: name -> Execution settings
CONFIGURATIONS = {**{engine: dict(engine=engine) for engine in ENGINES},
                  "eager, op by op": dict(engine="eager", whole_blocks=False)}
RATIOS = (("compiled", "eager"), ("eager", "eager, op by op"), ("eager", "jit"), ("compiled", "jit"),
          ("eager, op by op", "jit"))


def engine_steps(depth: int, shape: tuple, budget: int, seed: int = 0) -> dict[str, Callable]:
    """A training step (value and gradient) of an all-big ResNet per configuration (each engine;
    the eager one with every block op by op, ``Execution.whole_blocks=False``), and of its jitted
    twin: the step ``bench.step`` times, each placed as it places the timed one."""
    x, big, twin, loss = step_setup(depth, shape, seed)
    grad = nnx.value_and_grad(loss)
    plain = nnx.jit(nnx.value_and_grad(loss))
    steps = {}
    for name, settings in CONFIGURATIONS.items():
        ex = executions(budget, **settings)[1]
        xh = ex.to_host(x)
        steps[name] = lambda ex=ex, xh=xh: grad(big, xh, ex)
    xd = ex.to_compute(x)
    steps["jit"] = lambda: plain(twin, xd)
    return steps


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="1x1024x1024x3", type=_shape, help="NxHxWxC input")
    p.add_argument("--depth", type=int, default=18, choices=(18, 34, 50))
    p.add_argument("--budget", type=int, default=32 * 2**20, help="partition budget in bytes")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    times = paired_seconds(engine_steps(a.depth, a.shape, a.budget), a.rounds)
    for name, seconds in times.items():
        print(f"{name:>15}: median {statistics.median(seconds):7.3f} s  "
              f"({', '.join(f'{s:.2f}' for s in seconds)})")
    for a_, b_ in RATIOS:
        print(f"{a_} / {b_}: {median_ratio(times, a_, b_):.3f} (median of per-round ratios)")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in text.split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give an NxHxWxC shape such as 1x1024x1024x3")
    return shape


if __name__ == "__main__":
    sys.exit(run_cli(main))
