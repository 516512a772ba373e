"""Zhang et al.'s GroupNorm variant: every BatchNorm of the backbone becomes GroupNorm(C, C).

The official ``Resnet34Local`` replaces each ``BatchNorm2d(C)`` of the torchvision ResNet-34 (the
stem's too) by ``GroupNorm(C, C)``: one group per channel, fresh affine parameters (scale 1, bias 0),
each map normalised by its own per-channel mean and (biased) variance over its positions, in
training and evaluation alike — no running statistics, so nothing depends on batch 1 being a small
batch. On one slide's map (batch 1) those statistics are BatchNorm's batch statistics, so the Big
paths compute them as a training-mode BatchNorm does (the partitioned two-pass moments, or the
conv's own pass on the Fused path) and only the running averages are left out. On a batch of tiles
the in-memory path normalises each tile by its own statistics (GroupNorm's definition); the Big
paths refuse a batch (``require_one_map``).

References:
    Zhang et al., MICCAI 2022; official code cvlab-stonybrook/local_learning_wsi (network/resnet.py,
    ``batch_norm_to_group_norm``, ``Resnet34Local``). Wu & He, "Group Normalization", ECCV 2018.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.layers.batchnorm import big_batch_norm, fold_batch_norm
from bigjax.layers.execution import Execution
from bigjax.layers.modules import BigBatchNorm

__all__ = ["BigGroupNorm", "to_group_norm", "require_one_map", "NORMS"]

NORMS = ("batch", "group")


class BigGroupNorm(nnx.Module):
    """GroupNorm with one group per channel over NHWC maps, with ``BigBatchNorm``'s interface.

    Args:
      num_features: channels C.
      eps: added to the variance (torch's 1e-5).
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((num_features,)))
        self.bias = nnx.Param(jnp.zeros((num_features,)))
        self.eps = eps

    def folded(self, map_mean, map_var, count: int, *, train: bool, execution: Execution):
        """(a, b) with ``GN(x) = x*a + b`` from one map's statistics (``train`` changes nothing)."""
        scale, bias = execution.to_compute(self.scale[...]), execution.to_compute(self.bias[...])
        return fold_batch_norm(scale, bias, map_mean, map_var, self.eps)

    def __call__(self, x, *, train: bool, execution: Execution):
        """Partitioned GroupNorm of one map (batch 1) in host memory; result in host memory."""
        require_one_map(x.shape)
        y, _, _ = big_batch_norm(x, self.scale[...], self.bias[...], eps=self.eps, execution=execution)
        return y

    def plain(self, x, *, train: bool):
        """In-memory GroupNorm on the compute device (jittable): each map by its own statistics."""
        mean = jnp.mean(x, axis=(1, 2), keepdims=True)
        var = jnp.var(x, axis=(1, 2), keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


def require_one_map(shape) -> None:
    """The Big paths' GroupNorm statistics are over the whole batch: refuse more than one map."""
    if shape[0] != 1:
        raise ValueError(f"GroupNorm through Big-Layers normalises one map (batch 1), got shape "
                         f"{tuple(shape)}; run tile batches in memory")


def to_group_norm(model: nnx.Module) -> nnx.Module:
    """Replace every ``BigBatchNorm`` in ``model`` by a fresh ``BigGroupNorm`` (the official
    ``batch_norm_to_group_norm``: affine parameters start at 1 and 0); returns ``model``."""
    for _, module in list(nnx.iter_modules(model)):
        if isinstance(module, nnx.List):
            for i, value in enumerate(module):
                if isinstance(value, BigBatchNorm):
                    module[i] = BigGroupNorm(value.scale.shape[0], eps=value.eps)
            continue
        for name, value in list(vars(module).items()):
            if isinstance(value, BigBatchNorm):
                setattr(module, name, BigGroupNorm(value.scale.shape[0], eps=value.eps))
    return model
