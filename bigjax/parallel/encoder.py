"""One shard's encoder forward inside ``shard_map``, optionally in bfloat16.

A ResNet (``bigjax.models.resnet.ResNet``, or a ``BigResNet``'s parameters) runs its blocks through
``ShardedInMemory``, whose BatchNorm masks padding and synchronises statistics over the mesh when asked.
An encoder without BatchNorm (no ``nnx.BatchStat``, e.g. a ViT) is called as ``encoder(x, train=True)``:
its tiles do not interact, so sharding cannot change it.

bf16 compute (Campanella et al. train with PyTorch AMP): the parameters are cast to the compute dtype
inside the differentiated function, so activations and matmuls run in it while the parameters, their
gradients (the cast's transpose casts back) and the optimiser stay float32; BatchNorm moments and the
features handed to the aggregator are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models.resnet import ResNet
from bigjax.parallel.batchnorm import ShardedInMemory

__all__ = ["encode", "fresh"]


def fresh(state):
    """The same values in new ``Variable``s: a module merged from them inside a transformation
    (``jax.vjp``, ``jax.grad``) may update them there (flax refuses to mutate outer-trace ones)."""
    return jax.tree.map(lambda v: v, state)


def _cast(tree, dtype):
    return jax.tree.map(lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v,
                        tree)


def encode(graphdef, params, stats, tiles, mask, *, sync_bn: bool, dtype=jnp.float32,
           remat: bool = False):
    """Features (rows, D) float32 of one shard's tiles, and the encoder's updated ``BatchStat``s.

    Args:
      graphdef, params, stats: the encoder split as ``nnx.split(encoder, nnx.Param, nnx.BatchStat)``.
      tiles: this shard's (rows, H, W, 3) tiles, padding included; mask: (rows,) 1 = real tile.
      sync_bn: BatchNorm statistics over every shard (True) or this shard's only.
      dtype: compute dtype (float32 or bfloat16).
      remat: recompute each conv + BatchNorm in the backward (``jax.checkpoint``), ResNets only.
    """
    model = nnx.merge(graphdef, _cast(params, dtype), fresh(stats))
    x = tiles.astype(dtype)
    if isinstance(model, ResNet):
        path = ShardedInMemory(mask, sync_bn, remat)
        h = model.stages(path, model.stem(path, x, True), 0, 4, True)
        features = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    elif not jax.tree.leaves(stats):
        features = model(x, train=True).astype(jnp.float32)
    else:
        raise TypeError(f"{type(model).__name__} has BatchNorm statistics but is not a ResNet: the "
                        "encoder mesh masks padding and syncs statistics only through the ResNet "
                        "block interface (bigjax.models.resnet_paths)")
    return features, nnx.state(model, nnx.BatchStat)
