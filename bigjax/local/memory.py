"""Peak device memory of local training against end-to-end, from XLA's compiled memory analysis.

Each module's step (forward, loss, gradient) is one jitted function on the in-memory path; its
compiled ``memory_analysis()`` gives the bytes of its arguments, outputs and temporaries, and
``arguments + outputs + temporaries − aliased`` is what that function needs on the device at once.
Local training runs the modules one after another, so its peak is the largest module's; end-to-end
training is K = 1 (the whole backbone and H in one function, the same frozen stem). Nothing is run:
the functions are only compiled, for inputs of any size.

Zhang et al. (Table 2) report 30 % (K = 4) and 20 % (K = 8) of end-to-end memory on whole slides.

Beyond the paper, ``--big``: one Big-path training step is run (every module through Big-Layers with
one partition budget), and the distinct compute-device buffers are counted at every event of the
engine (``bench.memory.device_buffer_bytes``). Beyond what was on the device before the step (the
model and its optimiser state), the peak holds the streamed partitions (bounded by the budget), a
module's gradients and the RFR decoder's in-memory patches (ten patches of at most 128² at x_{i−1}'s
scale); none of it grows with the slide once the patches are whole.

    python -m bigjax.local.memory --side 1536 --modules 1,2,4,8
    python -m bigjax.local.memory --big --side 768,1536 --modules 4 --budget 16777216
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.bench.memory import device_buffer_bytes
from bigjax.errors import ArgumentParser, run_cli
from bigjax.layers.execution import Execution
from bigjax.local.model import LocalNetwork, local_resnet34
from bigjax.local.step import _in_memory_grad, make_optimizers, train_step
from bigjax.models.resnet_paths import InMemory

__all__ = ["module_peaks", "local_peak_bytes", "big_step_device_bytes"]


def module_peaks(net: LocalNetwork, side: int) -> list[dict]:
    """Compiled memory of each module's jitted step for a ``1 x side x side x 3`` input."""
    plan = net.sample(np.random.default_rng(0), (1, side, side, 3))
    x = jax.eval_shape(lambda: net.stem(InMemory, jnp.zeros((1, side, side, 3))))
    out = []
    for m, (positions, patch) in zip(net.local_modules, plan):
        graphdef, state = nnx.split(m)
        args = (graphdef, state, x, jnp.int32(0), jnp.asarray(positions))
        kw = dict(patch=patch, alpha=net.alpha, bn_train=net.bn_train)
        mem = _in_memory_grad.lower(*args, **kw).compile().memory_analysis()
        x = jax.eval_shape(lambda s, h: _in_memory_grad(graphdef, s, h, 0, positions, **kw)[1],
                           state, x)
        out.append(dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                        temp=mem.temp_size_in_bytes, alias=mem.alias_size_in_bytes,
                        peak=mem.argument_size_in_bytes + mem.output_size_in_bytes
                        + mem.temp_size_in_bytes - mem.alias_size_in_bytes))
    return out


def local_peak_bytes(n_modules: int, side: int, n_classes: int = 2) -> tuple[int, list[dict]]:
    """(peak bytes of one training step = the largest module's, per-module figures)."""
    peaks = module_peaks(local_resnet34(n_modules, n_classes, rngs=nnx.Rngs(0)), side)
    return max(p["peak"] for p in peaks), peaks


def big_step_device_bytes(n_modules: int, side: int, budget: int, seed: int = 0) -> dict:
    """Compute-device bytes of one Big-path local training step on a ``1 x side x side x 3`` slide:
    before the step (model, optimiser state) and the peak seen at any engine event during it."""
    net = local_resnet34(n_modules, 2, rngs=nnx.Rngs(seed))
    optimizers = make_optimizers(net)
    ex = Execution(budget)
    peak = [0]

    def observer(event, fn, *args, **kwargs):
        peak[0] = max(peak[0], device_buffer_bytes(ex.compute))
        return fn(*args, **kwargs)

    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(1, side, side, 3)).astype(np.float32)
    before = device_buffer_bytes(ex.compute)
    jax.block_until_ready(train_step(net, optimizers, x, 1, rng,
                                     execution=ex.replace(observer=observer)))
    return dict(side=side, before=before, peak=peak[0], beyond=peak[0] - before)


def _big_main(args) -> None:
    print(f"Big path, budget {args.budget:,} B, ResNet-34 (stem stride 3); compute-device buffers "
          "during one training step")
    print("| K | slide | x_0 (MiB) | before the step (MiB) | peak beyond it (MiB) |")
    print("|---|---|---|---|---|")
    for k in args.modules:
        for side in args.side:
            r = big_step_device_bytes(k, side, args.budget)
            x0 = (side // 6) ** 2 * 64 * 4 / 2**20  # the stem's output (stride 3, then the pool)
            print(f"| {k} | {side}² | {x0:,.0f} | {r['before'] / 2**20:,.1f} | "
                  f"{r['beyond'] / 2**20:,.1f} |")


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", default="1536", type=_ints,
                        help="input side in pixels (1 x side x side); with --big, a list")
    parser.add_argument("--modules", default="1,2,4,8", type=_ints, help="K values; 1 is end-to-end")
    parser.add_argument("--big", action="store_true",
                        help="run one Big-path step and count the compute device's buffers")
    parser.add_argument("--budget", type=int, default=16 * 2**20, help="partition budget (--big)")
    args = parser.parse_args(argv)
    if args.big:
        return _big_main(args)
    if len(args.side) != 1:
        parser.error(f"--side={','.join(map(str, args.side))}: one side without --big")
    args.side, ks = args.side[0], args.modules
    results = {k: local_peak_bytes(k, args.side) for k in ks}
    base = results[1][0] if 1 in results else None
    print(f"input 1x{args.side}x{args.side}x3, ResNet-34 (stem stride 3), compiled peak per step")
    print("| K | peak (MiB) | largest temp (MiB) | of end-to-end |")
    print("|---|---|---|---|")
    for k, (peak, modules) in results.items():
        ratio = f"{peak / base:.0%}" if base else "—"
        temp = max(m["temp"] for m in modules) / 2**20
        print(f"| {k} | {peak / 2**20:,.0f} | {temp:,.0f} | {ratio} |")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by commas")
    return values


if __name__ == "__main__":
    sys.exit(run_cli(main))
