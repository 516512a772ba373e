"""BatchNorm over the shards of a slide, inside ``shard_map``: synchronised or per-shard statistics.

``ShardedInMemory`` is the in-memory block interface of ``bigjax.models.resnet_paths`` (``fork``,
``conv_bn``, ``relu``, ``add_relu``, ``stem_pool``) for one shard of the encoder mesh. Its BatchNorm
takes moments over the shard's *real* tiles only (padding is masked out) and, with ``axis`` set,
sums them over the mesh axis (``lax.psum``), so every shard normalises with the statistics of the
whole slide — exactly one device's BatchNorm over all tiles (synchronised BatchNorm). With
``axis=None`` each shard uses its own statistics, as Campanella et al. do with one DDP rank per
shard.

Moments are two-pass (mean, then the mean squared deviation from it) in at least float32 whatever the
compute dtype, as mixed-precision training keeps BatchNorm in float32 (float64 parameters, as the
exactness tests use, compute in float64). The running statistics follow torch
(momentum, unbiased variance); with per-shard statistics they are updated with the count-weighted
average of the shards' moments, so every shard keeps the same running statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from bigjax.layers.conv import conv2d
from bigjax.layers.modules import BigBatchNorm
from bigjax.models.resnet_paths import InMemory
from bigjax.parallel.mesh import AXIS

__all__ = ["ShardedInMemory", "masked_moments", "wide"]


def wide(dtype):
    """The dtype statistics and features are computed in: ``dtype``, at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _sum(x, axis):
    return x if axis is None else lax.psum(x, axis)


def masked_moments(y: jax.Array, mask: jax.Array, axis: str | None):
    """Per-channel (mean, biased variance, count) of NHWC ``y`` over rows where ``mask`` is 1.

    With ``axis`` the sums run over every shard of that mesh axis. An empty shard (a slide with fewer
    tiles than devices) divides by one instead of zero: finite, unused statistics instead of NaN.
    """
    y = y.astype(wide(y.dtype))
    w = mask.astype(y.dtype)[:, None, None, None]
    count = _sum(jnp.sum(mask) * y.shape[1] * y.shape[2], axis)
    divisor = jnp.maximum(count, 1.0)
    mean = _sum(jnp.sum(w * y, axis=(0, 1, 2)), axis) / divisor
    var = _sum(jnp.sum(w * jnp.square(y - mean), axis=(0, 1, 2)), axis) / divisor
    return mean, var, count


def _update_running(bn: BigBatchNorm, mean, var, count, sync: bool) -> None:
    """torch's running update; per-shard moments are first averaged over the shards by count."""
    mean, var, count = lax.stop_gradient((mean, var, count))
    unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
    if not sync:
        total = jnp.maximum(lax.psum(count, AXIS), 1.0)  # an empty shard has weight 0
        mean, unbiased = (lax.psum(count * v, AXIS) / total for v in (mean, unbiased))
    m = bn.momentum
    bn.mean[...] = (1 - m) * bn.mean[...] + m * mean
    bn.var[...] = (1 - m) * bn.var[...] + m * unbiased


def _conv_bn_train(x, kernel, bias, scale, shift, mask, geom, eps, axis):
    """conv, then BatchNorm with masked (and, with ``axis``, synchronised) batch moments."""
    y = conv2d(x, kernel, geom)
    y = y if bias is None else y + bias
    mean, var, count = masked_moments(y, mask, axis)
    a = scale.astype(mean.dtype) * lax.rsqrt(var + eps)
    b = shift.astype(mean.dtype) - mean * a
    return (y.astype(mean.dtype) * a + b).astype(y.dtype), (mean, var, count)


_conv_bn_remat = jax.checkpoint(_conv_bn_train, static_argnums=(6, 7, 8))


@dataclass(frozen=True)
class ShardedInMemory:
    """In-memory layers of one shard; BatchNorm over the real tiles of the shard or of all shards.

    Attributes:
      mask: (rows,) 1.0 for a real tile of this shard, 0.0 for padding.
      sync: synchronised statistics (psum over ``AXIS``) or per-shard statistics.
      remat: ``jax.checkpoint`` each conv + BatchNorm: the backward recomputes the conv output and
        its normalisation from the block's input instead of keeping them.
    """

    mask: jax.Array
    sync: bool
    remat: bool = False

    def conv_bn(self, x, conv, bn, train):
        if not train:
            return bn.plain(conv.plain(x), train=False).astype(x.dtype)
        fn = _conv_bn_remat if self.remat else _conv_bn_train
        bias = None if conv.bias is None else conv.bias[...]
        out, (mean, var, count) = fn(x, conv.kernel[...], bias, bn.scale[...], bn.bias[...],
                                     self.mask, conv.geom, bn.eps, AXIS if self.sync else None)
        _update_running(bn, mean, var, count, self.sync)
        return out

    fork = staticmethod(InMemory.fork)
    relu = staticmethod(InMemory.relu)
    add_relu = staticmethod(InMemory.add_relu)
    stem_pool = staticmethod(InMemory.stem_pool)
