"""The encoder mesh's exchange, as Campanella et al. ("Beyond MIL") describe it, inside ``shard_map``.

Per step, on every shard of the mesh axis:

1. forward: this shard's replica of the encoder embeds its tiles, keeping the VJP (``jax.vjp``);
2. ``gather``: the shards' features are all-gathered and the padding removed -> (n_tiles, D);
3. ``aggregate``: the aggregator's loss and its gradients with respect to its parameters and to the
   features — one computation on replicated values (the same on every shard, so no rank waits for a
   scatter: SPMD's form of "rank 0 computes, then sends");
4. ``scatter``: each shard takes the rows of the feature gradient that belong to its tiles;
5. ``encoder_vjp``: the gradient of the pseudo-loss ``pseudo_loss(f, g) = Σ f·g`` (g held constant)
   pulled through the shard's encoder VJP;
6. the shards' encoder gradients are summed over the axis (``lax.psum``).

The N factor. Campanella et al. back-propagate ``l_e = N·Σ f·g`` because DDP *averages* gradients over
its N ranks. Step 6 here is a sum, and the sum of the shards' ``Σ f·g`` gradients is exactly the
gradient of the slide loss, so our pseudo-loss has no N. (Inside ``shard_map`` the replica is made
explicitly per-shard with ``lax.pcast(..., to="varying")``; without it JAX's autodiff would already sum
the replicas' gradients and a psum on top would multiply them by N.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from bigjax.models.mil import bag_loss
from bigjax.parallel.encoder import encode, fresh
from bigjax.parallel.mesh import AXIS, ShardLayout

__all__ = ["slide_loss", "gather", "aggregate", "scatter", "pseudo_loss", "encoder_vjp", "explicit_shard_step"]


def slide_loss(head, features, label):
    """The default objective: the aggregator's bag loss of the slide (``mil.bag_loss``)."""
    return bag_loss(head(features, train=True), label)


def gather(features: jax.Array, layout: ShardLayout) -> jax.Array:
    """All shards' features (rows, D) -> the slide's (n_tiles, D), in slide order, no padding.

    ``to="invarying"``: the result is the same on every shard, so what is computed from it (the
    aggregator) is one replicated computation whose gradients JAX does not sum over the axis.
    """
    every = lax.all_gather(features, AXIS, tiled=True, to="invarying")
    return every[jnp.asarray(layout.index)]


def aggregate(head_def, head_params, head_rest, features, label, loss_fn):
    """Aggregator loss, its gradients (head parameters, features), and the head's updated state."""
    def loss(params, features):
        head = nnx.merge(head_def, params, fresh(head_rest))
        return loss_fn(head, features, label), nnx.split(head, nnx.Param, ...)[2]

    (value, rest), (g_head, g_features) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        head_params, features)
    return value, g_head, g_features, rest


def scatter(feature_grads: jax.Array, layout: ShardLayout) -> jax.Array:
    """The slide's (n_tiles, D) feature gradient -> this shard's padded rows (zero on padding)."""
    padded = jnp.zeros((layout.n_shards * layout.per_shard, feature_grads.shape[1]),
                       feature_grads.dtype).at[jnp.asarray(layout.index)].set(feature_grads)
    start = lax.axis_index(AXIS) * layout.per_shard
    return lax.dynamic_slice_in_dim(padded, start, layout.per_shard)


def pseudo_loss(features: jax.Array, feature_grads: jax.Array) -> jax.Array:
    """Campanella et al.'s encoder pseudo-loss ``Σ f·g`` with g constant (no N: see the module doc)."""
    return jnp.sum(features * lax.stop_gradient(feature_grads))


def encoder_vjp(pull, features, feature_grads):
    """Encoder gradient of ``pseudo_loss`` through the forward's VJP ``pull`` (residuals kept).

    ``∂ pseudo_loss / ∂ f = g``; pulling it through the encoder's VJP is what ``l_e.backward()`` does
    with the graph PyTorch retained, without re-running the forward.
    """
    (grads,) = pull(jax.grad(pseudo_loss)(features, feature_grads))
    return grads


def explicit_shard_step(enc_params, enc_stats, head_params, head_rest, tiles, mask, label, *,
                        enc_def, head_def, layout: ShardLayout, sync_bn: bool, dtype, remat, loss_fn):
    """Steps 1–6 of the module docstring on one shard (the body of a ``shard_map``).

    Returns:
      (loss, encoder grads summed over the axis, head grads, encoder BatchStats, head state), all
      replicated.
    """
    replica = lax.pcast(enc_params, AXIS, to="varying")  # this shard's copy of the encoder

    def forward(params):
        return encode(enc_def, params, enc_stats, tiles, mask, sync_bn=sync_bn, dtype=dtype,
                      remat=remat)

    features, pull, stats = jax.vjp(forward, replica, has_aux=True)
    loss, g_head, g_features, head_rest = aggregate(
        head_def, head_params, head_rest, gather(features, layout), label, loss_fn)
    g_encoder = encoder_vjp(pull, features, scatter(g_features, layout))
    return loss, lax.psum(g_encoder, AXIS), g_head, stats, head_rest
