"""Big-Layers for ViTs: each stage of a ViT streams partitions of tiles (the batch) through the device.

A tile's tokens are its activation. ``BigViT`` runs the patch embedding, every transformer block and
the final norm + pooling as one streamed op each (a ``jax.custom_vjp``), with the tokens between stages
in host memory — the Big-Layers scheme (Algorithms 1–2 of the paper: partitions in, results out) applied
along the batch axis, where a block needs no halo because attention mixes tokens of one tile only:

* forward: for each partition of tiles, its input slice goes to the compute device, a jitted kernel
  runs the stage, and the output slice comes back to the host; the stage's (host) input is its residual;
* backward: per partition, the stage is recomputed on the device under ``jax.vjp`` (activation
  checkpointing per block and partition, Chen et al. 2016), the input cotangent goes back to the host
  and the parameter cotangents accumulate on the device.

Gradients are those of the in-memory ``ViT`` with the same parameters (summed per partition, so equal up
to float32 round-off). Partitions hold as many tiles as ``execution.max_partition_bytes`` allows by
``tile_bytes``' estimate of one tile's device footprint in the backward pass. A block of which not one
tile fits streams token ranges and attention blocks instead (``vit_streamed``, ``attention=``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.layers.bands import take_band
from bigjax.layers.execution import Execution, ensure_eager, zeros_like
from bigjax.models.vit import ViT, ViTConfig, config_for, embed_tokens, pool_tokens
from bigjax.models.vit_streamed import stage_backward, stage_forward, streamed_block

__all__ = ["BigViT", "build_big", "in_memory_twin", "tile_bytes", "VIT_EVENTS", "ATTENTION"]

ATTENTION = ("auto", "plain", "streamed")  # how a BigViT block runs (see BigViT)

VIT_EVENTS = {
    "vit_forward": "a ViT stage (embedding, block, head or a streamed block's token-wise half) on one "
                   "partition of tiles or tokens",
    "vit_backward": "a recomputed ViT stage's pullback on one partition of tiles or tokens",
}


def _run(kind: str, config: ViTConfig, parts, x):
    if kind == "embed":
        return embed_tokens(config, parts, x)
    if kind == "block":
        return parts(x)
    return pool_tokens(config, parts, x)


@dataclass(frozen=True)
class _Stage:
    graphdef: object
    kind: str  # "embed" | "block" | "head"
    config: ViTConfig
    tiles: int  # tiles per partition
    ex: Execution


def _partitions(stage: _Stage, n: int):
    return [(a, min(a + stage.tiles, n)) for a in range(0, n, stage.tiles)]


def _take(ex: Execution, x, a: int, b: int):
    """Tiles [a, b) of host array ``x``, cut on the host and sent to the compute device."""
    band = ex.call("take_band", take_band, x, a, b, 0, x.shape[1])
    return ex.to_compute(band)


def _join(ex: Execution, parts):
    if len(parts) == 1:
        return parts[0]
    return ex.call("join_bands", jnp.concatenate, parts, axis=0)


def _forward(stage: _Stage, state, x):
    ex = stage.ex
    on_device = jax.tree.map(ex.to_compute, state)
    out = []
    for a, b in _partitions(stage, x.shape[0]):
        y = ex.call("vit_forward", stage_forward, _run, stage.graphdef, stage.kind, stage.config,
                    on_device, _take(ex, x, a, b))
        out.append(ex.to_host(y))
        del y
    return _join(ex, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _streamed(stage, state, x):
    ensure_eager(f"BigViT's {stage.kind} stage", state, x)
    return _forward(stage, state, stage.ex.to_host(x))


def _streamed_fwd(stage, state, x):
    ensure_eager(f"BigViT's {stage.kind} stage", state, x)
    host_x = stage.ex.to_host(x)
    return _forward(stage, state, host_x), (state, x, host_x)


def _streamed_bwd(stage, res, g):
    state, x, host_x = res
    ex = stage.ex
    on_device = jax.tree.map(ex.to_compute, state)
    acc, g, dx = zeros_like(on_device), ex.to_host(g), []
    for a, b in _partitions(stage, host_x.shape[0]):
        acc, d = ex.call("vit_backward", stage_backward, _run, stage.graphdef, stage.kind, stage.config,
                         acc, on_device, _take(ex, host_x, a, b), _take(ex, g, a, b))
        dx.append(ex.to_host(d))
        del d
    d_state = jax.tree.map(ex.to_device_of, acc, state)
    return d_state, ex.to_device_of(_join(ex, dx), x)


_streamed.defvjp(_streamed_fwd, _streamed_bwd)


def tile_bytes(kind: str, config: ViTConfig, in_shape, itemsize: int = 4) -> int:
    """Estimated device bytes of one tile in a stage's backward kernel (the larger pass).

    Block: input, output and their cotangents, qkv, attention scores and probabilities per head, the
    MLP's hidden activations, doubled for the pullback's residuals. For ViT-B/16 at 224² this gives
    34.1 MB per tile, where XLA:CPU's compiled memory analysis of the block's backward kernel grows by
    31.7 MB per tile (8 → 16 tiles; docs/benchmarks.md, "ViT").
    """
    d, heads = config.embed_dim, config.num_heads
    hidden = int(d * config.mlp_ratio)
    if kind == "embed":
        length = int(np.prod(in_shape[:2])) // config.patch_size ** 2 + config.num_prefix
        floats = 2 * int(np.prod(in_shape)) + 4 * length * d
    elif kind == "block":
        length = in_shape[0]
        floats = 2 * (10 * length * d + 2 * heads * length * length + 3 * length * hidden)
    else:
        floats = 3 * int(np.prod(in_shape)) + 4 * d
    return floats * itemsize


def _param_bytes(state) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


class BigViT(ViT):
    """A ``ViT`` whose stages stream partitions of tiles through the device (see the module doc).

    Call ``model(x, train=..., execution=...)`` outside ``jit`` with NHWC float32 tiles (numpy or
    JAX); ``nnx.grad`` works with respect to the parameters and to ``x``. The embedding comes back on
    the execution's compute device; ``execution`` defaults to ``Execution()``.

    ``attention`` says how a block runs: "plain" streams whole tiles through the block; "streamed"
    takes the block apart and streams token ranges and attention blocks (``vit_streamed``), for
    sequences of which not one tile fits the budget; "auto" (default) streams a block's attention
    exactly when one tile of it does not fit ``execution.max_partition_bytes``.
    """

    def __init__(self, config: ViTConfig, *, attention: str = "auto", rngs: nnx.Rngs | None = None):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        super().__init__(config, rngs=rngs)
        self.attention = attention

    def __call__(self, x, *, train: bool = False, execution: Execution | None = None):
        ex = execution or Execution()
        tokens = self._stage("embed", self.embed_parts(), x, ex)
        for block in self.blocks:
            tokens = self._block(block, tokens, ex)
        return ex.to_compute(self._stage("head", self.head_parts(), tokens, ex))

    def _block(self, block, x, ex: Execution):
        fits = self._tiles(block, "block", x)[0] <= ex.max_partition_bytes
        if self.attention == "streamed" or (self.attention == "auto" and not fits):
            return streamed_block(block, self.config, x, ex)
        return self._stage("block", block, x, ex)

    def _tiles(self, parts, kind, x):
        """(bytes of one tile's partition with the parameters, of the parameters, of a tile)."""
        fixed = 3 * _param_bytes(nnx.state(parts))  # parameters, their cotangent and its accumulator
        per_tile = tile_bytes(kind, self.config, x.shape[1:], np.dtype(x.dtype).itemsize)
        return fixed + per_tile, fixed, per_tile

    def _stage(self, kind, parts, x, ex: Execution):
        need, fixed, per_tile = self._tiles(parts, kind, x)
        if need > ex.max_partition_bytes:
            hint = "; attention='streamed' streams its tokens" if kind == "block" else ""
            raise ValueError(
                f"budget {ex.max_partition_bytes:,} B is below one tile of this ViT's {kind} stage "
                f"(needs {need:,} B: {fixed:,} B of parameters, {per_tile:,} B per tile{hint})")
        tiles = int(min(x.shape[0], (ex.max_partition_bytes - fixed) // per_tile))
        graphdef, state = nnx.split(parts)
        return _streamed(_Stage(graphdef, kind, self.config, tiles, ex), state, x)


def build_big(name: str, *, attention: str = "auto", rngs: nnx.Rngs | None = None,
              **overrides) -> BigViT:
    """``vit.build`` for the streamed model: the same named configs and overrides; ``attention`` as
    ``BigViT``'s."""
    return BigViT(config_for(name, **overrides), attention=attention, rngs=rngs)


def in_memory_twin(model: ViT) -> ViT:
    """A plain in-memory ``ViT`` with a copy of ``model``'s parameters."""
    twin = ViT(model.config)
    nnx.update(twin, nnx.clone(nnx.state(model)))
    return twin
