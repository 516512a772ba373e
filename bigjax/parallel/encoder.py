"""One shard's encoder forward inside ``shard_map``, optionally in bfloat16.

A ResNet (``bigjax.models.resnet.ResNet``, or a ``BigResNet``'s parameters) runs its blocks through
``ShardedInMemory``, whose BatchNorm masks padding and synchronises statistics over the mesh when asked.
An encoder without BatchNorm (no ``nnx.BatchStat``, e.g. a ViT) is called as ``encoder(x, train=True)``:
its tiles do not interact, so sharding cannot change it.

Remat (``jax.checkpoint``, Chen et al. "Training deep nets with sublinear memory cost"): ``"conv"``
checkpoints each conv + BatchNorm (the backward recomputes the conv output and its normalisation);
``"block"`` the stem and each residual block, so only the tiles and the blocks' inputs are kept and
the backward recomputes a block's inner activations one block at a time.

bf16 compute (Campanella et al. train with PyTorch AMP): the parameters are cast to the compute dtype
inside the differentiated function, so activations and matmuls run in it while the parameters, their
gradients (the cast's transpose casts back) and the optimiser stay float32; BatchNorm moments and the
features handed to the aggregator are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models.resnet import ResNet, remat_trunk
from bigjax.parallel.batchnorm import ShardedInMemory, wide

__all__ = ["encode", "fresh", "check_remat", "REMAT"]

REMAT = ("none", "conv", "block")


def fresh(state):
    """The same values in new ``Variable``s: a module merged from them inside a transformation
    (``jax.vjp``, ``jax.grad``) may update them there (flax refuses to mutate outer-trace ones)."""
    return jax.tree.map(lambda v: v, state)


def _cast(tree, dtype):
    return jax.tree.map(lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v,
                        tree)


def check_remat(remat: str) -> str:
    """``remat`` if it is one of ``REMAT``."""
    if remat not in REMAT:
        raise ValueError(f"remat={remat!r}: choose one of {', '.join(REMAT)}")
    return remat


def _trunk(model: ResNet, path, x, remat: str):
    """Stem and residual stages; with "block" the stem and each block are checkpointed
    (``resnet.remat_trunk``), so what stays for the backward is the tiles and each block's input."""
    if remat != "block":
        return model.stages(path, model.stem(path, x, True), 0, 4, True)
    return remat_trunk(model, path, x, True)


def encode(graphdef, params, stats, tiles, mask, *, sync_bn: bool, dtype=jnp.float32,
           remat: str = "none"):
    """Features (rows, D), at least float32, of one shard's tiles, and the encoder's updated ``BatchStat``s.

    Args:
      graphdef, params, stats: the encoder split as ``nnx.split(encoder, nnx.Param, nnx.BatchStat)``.
      tiles: this shard's (rows, H, W, 3) tiles, padding included; mask: (rows,) 1 = real tile.
      sync_bn: BatchNorm statistics over every shard (True) or this shard's only.
      dtype: compute dtype (float32 or bfloat16; float64 where the parameters are, in x64 tests).
      remat: one of ``REMAT`` (ResNets only): keep every activation ("none"), or recompute each
        conv + BatchNorm ("conv") or the stem and each residual block ("block") in the backward.
    """
    model = nnx.merge(graphdef, _cast(params, dtype), fresh(stats))
    x = tiles.astype(dtype)
    if isinstance(model, ResNet):
        path = ShardedInMemory(mask, sync_bn, remat == "conv")
        h = _trunk(model, path, x, remat)
        features = jnp.mean(h.astype(wide(h.dtype)), axis=(1, 2))
    elif not jax.tree.leaves(stats):
        features = model(x, train=True)
        features = features.astype(wide(features.dtype))
    else:
        raise TypeError(f"{type(model).__name__} has BatchNorm statistics but is not a ResNet: the "
                        "encoder mesh masks padding and syncs statistics only through the ResNet "
                        "block interface (bigjax.models.resnet_paths)")
    return features, nnx.state(model, nnx.BatchStat)
