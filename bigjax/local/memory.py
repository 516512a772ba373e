"""Peak device memory of local training against end-to-end, from XLA's compiled memory analysis.

Each module's step (forward, loss, gradient) is one jitted function on the in-memory path; its
compiled ``memory_analysis()`` gives the bytes of its arguments, outputs and temporaries, and
``arguments + outputs + temporaries − aliased`` is what that function needs on the device at once.
Local training runs the modules one after another, so its peak is the largest module's; end-to-end
training is K = 1 (the whole backbone and H in one function, the same frozen stem). Nothing is run:
the functions are only compiled, for inputs of any size.

Zhang et al. (Table 2) report 30 % (K = 4) and 20 % (K = 8) of end-to-end memory on whole slides.

    python -m bigjax.local.memory --side 1536 --modules 1,2,4,8
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.local.model import LocalNetwork, local_resnet34
from bigjax.local.step import _in_memory_grad
from bigjax.models.resnet_paths import InMemory

__all__ = ["module_peaks", "local_peak_bytes"]


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=1536, help="input side in pixels (1 x side x side)")
    parser.add_argument("--modules", default="1,2,4,8", help="K values; 1 is end-to-end")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.modules.split(",")]
    results = {k: local_peak_bytes(k, args.side) for k in ks}
    base = results[1][0] if 1 in results else None
    print(f"input 1x{args.side}x{args.side}x3, ResNet-34 (stem stride 3), compiled peak per step")
    print("| K | peak (MiB) | largest temp (MiB) | of end-to-end |")
    print("|---|---|---|---|")
    for k, (peak, modules) in results.items():
        ratio = f"{peak / base:.0%}" if base else "—"
        temp = max(m["temp"] for m in modules) / 2**20
        print(f"| {k} | {peak / 2**20:,.0f} | {temp:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
