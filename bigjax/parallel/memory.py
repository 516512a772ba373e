"""Tiles per encoder device that fit, from XLA's compiled memory analysis of one shard's step.

    python -m bigjax.parallel.memory --depth=18 --tile=224 --tiles=2,4 --device_gb=80

compiles the mesh step (``mesh_value_and_grad``'s jitted program) on a one-device mesh — the program
every shard runs, collectives aside — for each count of tiles per device and each of ``CONFIGS``
(float32 or bfloat16, without remat or with remat per conv + BatchNorm or per residual block; pick
some with ``--configs=float32,bfloat16+block``), reads ``temp_size_in_bytes`` and the argument bytes, and extrapolates linearly
(temp grows linearly in the tiles) to the count that fits ``device_gb``. Also prints what each device exchanges per step: the
all-gathered features, no feature gradients (the aggregator is replicated, each shard slices its
rows), and the psum of the encoder gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.errors import ArgumentParser
from bigjax.models import mil
from bigjax.models.resnet import ResNet
from bigjax.parallel import step
from bigjax.parallel.exchange import slide_loss
from bigjax.parallel.mesh import AXIS, ShardLayout, encoder_mesh, replicate, to_mesh
from jax.sharding import PartitionSpec as P

__all__ = ["step_memory", "CONFIGS"]

# name -> (compute dtype, remat)
CONFIGS = {"float32": (jnp.float32, "none"), "float32+conv": (jnp.float32, "conv"),
           "float32+block": (jnp.float32, "block"), "bfloat16": (jnp.bfloat16, "none"),
           "bfloat16+block": (jnp.bfloat16, "block")}


def step_memory(depth: int, tile: int, tiles: int, dtype, remat: str) -> tuple[int, int]:
    """(temp bytes, argument bytes) of one shard's compiled step with ``tiles`` tiles."""
    mesh = encoder_mesh(1)
    encoder = ResNet(depth, rngs=nnx.Rngs(0))
    head = mil.build("abmil", encoder.embed_dim, 2, rngs=nnx.Rngs(1))
    layout = ShardLayout(tiles, 1)
    enc_def, enc_params, enc_stats = nnx.split(encoder, nnx.Param, nnx.BatchStat)
    head_def, head_params, head_rest = nnx.split(head, nnx.Param, ...)
    args = (*replicate((enc_params, enc_stats, head_params, head_rest), mesh),
            to_mesh(np.zeros((tiles, tile, tile, 3), np.float32), mesh, P(AXIS)),
            to_mesh(layout.mask, mesh, P(AXIS)), to_mesh(np.int32(0), mesh))
    compiled = step._step.lower(
        *args, mesh=mesh, enc_def=enc_def, head_def=head_def, layout=layout, sync_bn=True,
        dtype=dtype, remat=remat, loss_fn=slide_loss, collectives="explicit").compile()
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes, m.argument_size_in_bytes


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--tiles", default="2,4", help="two tile counts per device to fit a line")
    parser.add_argument("--device_gb", type=float, default=80.0)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of: "
                        + ", ".join(CONFIGS))
    opts = parser.parse_args(argv)
    unknown = [c for c in opts.configs.split(",") if c not in CONFIGS]
    if unknown:
        raise ValueError(f"--configs: {unknown[0]!r} is not one of {', '.join(CONFIGS)}")
    counts = [int(t) for t in opts.tiles.split(",")]
    embed = 512 if opts.depth < 50 else 2048
    for name in opts.configs.split(","):
        dtype, remat = CONFIGS[name]
        sizes = [step_memory(opts.depth, opts.tile, k, dtype, remat) for k in counts]
        per_tile = (sizes[1][0] - sizes[0][0]) / (counts[1] - counts[0])
        fixed = sizes[0][0] - per_tile * counts[0] + sizes[0][1]
        fit = int((opts.device_gb * 2**30 - fixed) // per_tile)
        print(f"ResNet-{opts.depth} {opts.tile}px {name}: temp {[s[0] for s in sizes]} B at "
              f"{counts} tiles; {per_tile / 2**20:.1f} MiB/tile; ~{fit} tiles fit {opts.device_gb:g} GB")
    params = sum(v.size for v in jax.tree.leaves(nnx.state(ResNet(opts.depth), nnx.Param)))
    print(f"exchange per device per step: features all-gathered {embed * 4} B per tile of the slide; "
          f"feature gradients 0 B (each shard slices the replicated gradient); encoder gradient "
          f"psum over {params:,} float32 parameters ({params * 4 / 2**20:.1f} MiB)")

if __name__ == "__main__":
    main()
