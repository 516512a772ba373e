"""Loss and gradients of encoder + aggregator on one slide whose tiles are spread over the encoder mesh.

``mesh_value_and_grad(..., collectives="explicit")`` runs the paper's exchange written out
(``exchange.explicit_shard_step``: gather, aggregate, scatter, pseudo-loss VJP, psum);
``collectives="xla"`` is the plain version — ``jax.value_and_grad`` of the whole sharded function, the
encoder in a ``shard_map`` and the aggregator outside it, with XLA inserting the all-gather of the
features and autodiff the sum of the replicas' gradients. Both equal one device's gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from bigjax.parallel.encoder import check_remat, encode, fresh
from bigjax.parallel.exchange import explicit_shard_step, slide_loss
from bigjax.parallel.mesh import AXIS, ShardLayout, encoder_mesh, local, replicate, to_mesh

__all__ = ["mesh_value_and_grad", "COLLECTIVES"]

COLLECTIVES = ("explicit", "xla")
_SPECS = (P(), P(), P(), P(), P(AXIS), P(AXIS), P())  # params, stats, head, head state, tiles, mask, label


def _xla_step(enc_params, enc_stats, head_params, head_rest, tiles, mask, label, *, mesh, enc_def,
              head_def, layout, sync_bn, dtype, remat, loss_fn):
    """The plain version: autodiff of (sharded encoder -> gathered features -> aggregator loss)."""
    encode_shards = jax.shard_map(
        functools.partial(encode, enc_def, sync_bn=sync_bn, dtype=dtype, remat=remat), mesh=mesh,
        in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=(P(AXIS), P()))

    def loss(enc_params, head_params):
        features, stats = encode_shards(enc_params, enc_stats, tiles, mask)
        head = nnx.merge(head_def, head_params, fresh(head_rest))
        value = loss_fn(head, features[jnp.asarray(layout.index)], label)
        return value, (stats, nnx.split(head, nnx.Param, ...)[2])

    (value, (stats, rest)), (g_enc, g_head) = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(enc_params, head_params)
    return value, g_enc, g_head, stats, rest


@functools.partial(jax.jit, static_argnames=("mesh", "enc_def", "head_def", "layout", "sync_bn",
                                             "dtype", "remat", "loss_fn", "collectives"))
def _step(*args, mesh, enc_def, head_def, layout, sync_bn, dtype, remat, loss_fn, collectives):
    settings = dict(enc_def=enc_def, head_def=head_def, layout=layout, sync_bn=sync_bn, dtype=dtype,
                    remat=remat, loss_fn=loss_fn)
    if collectives == "xla":
        return _xla_step(*args, mesh=mesh, **settings)
    body = functools.partial(explicit_shard_step, **settings)
    return jax.shard_map(body, mesh=mesh, in_specs=_SPECS, out_specs=P())(*args)


def mesh_value_and_grad(encoder: nnx.Module, head: nnx.Module, tiles, label, *,
                        mesh: Mesh | None = None, sync_bn: bool = True, dtype=jnp.float32,
                        remat: str = "none", collectives: str = "explicit", loss_fn=slide_loss):
    """Slide loss and gradients with the slide's tiles spread over ``mesh`` (one jitted step).

    Args:
      encoder: a ``ResNet`` (any encoder with the ResNet block interface), or an encoder without
        BatchNorm called as ``encoder(x, train=True)``; its ``BatchStat``s are updated in place
        (with ``mesh.local`` copies: they stay on one device per process).
      head: a MIL aggregator (``bigjax.models.mil.build``); its non-parameter state (RNG counts) is
        updated in place.
      tiles: (n_tiles, H, W, 3) float32 host array, any n_tiles >= 1 (padded and masked per shard).
      label: the slide's integer class.
      mesh: a 1-D ``encoder_mesh`` (default: every device of the run).
      sync_bn: BatchNorm statistics over all the slide's tiles (True, equal to one device) or per
        shard (False, Campanella et al.'s DDP practice).
      dtype: compute dtype of the encoder, ``jnp.float32`` or ``jnp.bfloat16`` (parameters, gradients
        and the aggregator stay float32).
      remat: ``jax.checkpoint`` in a ResNet encoder (less memory, more compute): "none", "conv"
        (each conv + BatchNorm) or "block" (each residual block); ``encoder.REMAT``.
      collectives: "explicit" (the paper's gather / aggregate / scatter / pseudo-loss VJP) or "xla"
        (``jax.value_and_grad`` of the sharded function).
      loss_fn: ``loss_fn(head, features, label)`` -> scalar (default ``slide_loss``: the bag loss;
        a batch of bags can pass its tiles together and split the features here).
    Returns:
      ``(loss, (encoder_grads, head_grads))``, float32, replicated over the mesh.
    """
    if collectives not in COLLECTIVES:
        raise ValueError(f"collectives={collectives!r}: choose one of {', '.join(COLLECTIVES)}")
    check_remat(remat)
    mesh = mesh or encoder_mesh()
    layout = ShardLayout(len(tiles), mesh.size)
    enc_def, enc_params, enc_stats = nnx.split(encoder, nnx.Param, nnx.BatchStat)
    head_def, head_params, head_rest = nnx.split(head, nnx.Param, ...)
    state = replicate((enc_params, enc_stats, head_params, head_rest), mesh)
    tiles = np.asarray(tiles)
    tiles = tiles.astype(np.promote_types(tiles.dtype, np.float32))  # float64 stays (x64 tests)
    sharded = (to_mesh(layout.pad(tiles), mesh, P(AXIS)),
               to_mesh(layout.mask, mesh, P(AXIS)), to_mesh(np.int32(label), mesh))
    loss, g_enc, g_head, stats, rest = _step(
        *state, *sharded, mesh=mesh, enc_def=enc_def, head_def=head_def, layout=layout,
        sync_bn=sync_bn, dtype=dtype, remat=remat, loss_fn=loss_fn, collectives=collectives)
    nnx.update(encoder, local(stats))  # the modules' state stays on one device per process
    nnx.update(head, local(rest))
    return loss, (g_enc, g_head)
