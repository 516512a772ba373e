"""The encoder mesh with Big-Layers shards: N streaming engines, one per device, driven eagerly.

A ``BigResNet``'s ops run eagerly (Python loops over partitions), so they cannot sit inside
``shard_map``. Here the mesh is a list of ``Execution``s (each with its own compute device and a CPU
host device), and one process drives the N engines in turn — on a CPU that is sequential; on N GPUs
the dispatches are asynchronous, so the engines overlap as far as the Python driver lets them.
The exchange is the paper's, with the same functions as the in-memory mesh (``exchange``): forward
per shard keeping its VJP; gather the features on the aggregator device (the first execution's);
``aggregate``; scatter the feature-gradient rows to their devices; ``encoder_vjp`` per shard; sum the
encoder gradients on the aggregator device.

BatchNorm over shards:

* per shard (``sync_bn=False``, Campanella et al.): each engine is an independent replica with its own
  statistics; the running statistics afterwards are the tile-weighted average of the replicas'.
* synchronised (``sync_bn=True``): the engines run layer by layer in lockstep (``Lockstep``). Each
  conv's pass gives its shard's per-channel moments (the fused path's statistics); they are merged
  over shards as the ops merge per-band moments (Chan et al.'s pairwise update, here differentiable),
  folded once, and the folded ``a, b`` sent to every device: exactly one device's BatchNorm over the
  whole slide. The shards' backward passes are then coupled through those statistics, so one VJP
  runs them all and JAX sums each parameter's cotangents over its N uses. All four stages run in
  lockstep whatever ``big_stages`` is: the stages one engine would run as its jitted in-memory tail
  run as the same ops with no partition budget (one partition per activation, as in memory), the
  same arithmetic to float32 round-off.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.layers import big_conv2d_stats, host
from bigjax.layers.execution import Execution
from bigjax.models.resnet import BigResNet
from bigjax.models.resnet_paths import Folded, Fused
from bigjax.parallel.encoder import fresh
from bigjax.parallel.exchange import aggregate, encoder_vjp, slide_loss
from bigjax.parallel.mesh import ShardLayout

__all__ = ["big_mesh_value_and_grad", "Lockstep", "merge_shard_moments"]

_UNBOUNDED = 2**62  # partition budget of the stages past big_stages: whole activations


def merge_shard_moments(parts):
    """(count, mean, biased var) per shard -> the pooled mean and biased variance (Chan et al. 1979)."""
    total = sum(c for c, _, _ in parts)
    mean = sum(c * m for c, m, _ in parts) / total
    var = sum(c * (v + jnp.square(m - mean)) for c, m, v in parts) / total
    return mean, var


def _conv_stats(x, conv, ex):
    """The fused path's conv: output and its moments, applying a pending folded BatchNorm + ReLU.

    The kernel goes to this engine's device by a differentiable ``device_put``, so each engine's
    kernel gradient comes back to where the (shared) parameter lives and JAX can add them there.
    """
    g, pre = conv.geom, {}
    if isinstance(x, Folded):
        if not x.relu:
            raise ValueError("a folded BatchNorm feeds a conv only through a ReLU")
        x, pre = x.y, dict(pre_scale=x.a, pre_shift=x.b)
    return big_conv2d_stats(x, ex.to_compute(conv.kernel[...]), stride=g.stride, padding=g.padding,
                            dilation=g.dilation, execution=ex, **pre)


@dataclass(frozen=True)
class Lockstep:
    """The fused Big path of N engines, layer by layer, with BatchNorm statistics over all shards.

    Values are tuples with one host activation (or ``Folded``) per execution.
    """

    executions: tuple[Execution, ...]

    def fork(self, xs):
        forks = [Fused(ex).fork(x) for x, ex in zip(xs, self.executions)]
        return tuple(x for x, _ in forks), tuple(skip for _, skip in forks)

    def conv_bn(self, xs, conv, bn, train):
        parts = [_conv_stats(x, conv, ex) for x, ex in zip(xs, self.executions)]
        lead = self.executions[0]
        counts = [y.size // y.shape[-1] for y, _, _ in parts]
        mean, var = merge_shard_moments([(c, lead.to_compute(m), lead.to_compute(v))
                                         for c, (_, m, v) in zip(counts, parts)])
        a, b = bn.folded(mean, var, sum(counts), train=train, execution=lead)
        return tuple(Folded(y, ex.to_compute(a), ex.to_compute(b))
                     for (y, _, _), ex in zip(parts, self.executions))

    @staticmethod
    def relu(xs):
        return tuple(map(Fused.relu, xs))

    def add_relu(self, xs, shortcuts):
        return tuple(Fused(ex).add_relu(x, s) for x, s, ex in zip(xs, shortcuts, self.executions))

    def stem_pool(self, xs):
        return tuple(Fused(ex).stem_pool(x) for x, ex in zip(xs, self.executions))


def _check(encoder, sync_bn):
    if not isinstance(encoder, BigResNet):
        raise TypeError(f"Big shards need a BigResNet encoder, got {type(encoder).__name__}")
    if sync_bn and not encoder.fused:
        raise ValueError("synchronised BatchNorm over Big shards runs the fused path in lockstep; "
                         "this encoder has fused=False (use fused=True, or sync_bn=False)")


def _replica_forward(graphdef, params, stats, tiles, ex):
    """One engine's forward of its shard, with that device's replica of the encoder; keeps the VJP."""
    params, stats = jax.device_put((params, stats), ex.compute)

    def forward(params):
        model = nnx.merge(graphdef, params, fresh(stats))
        return model(tiles, train=True, execution=ex), nnx.state(model, nnx.BatchStat)

    return jax.vjp(forward, params, has_aux=True)


def _lockstep_forward(graphdef, params, stats, shards, executions):
    """All engines' forward in lockstep (synchronised BatchNorm); one VJP for all of them."""
    def forward(params):
        model = nnx.merge(graphdef, params, fresh(stats))
        path, big = Lockstep(tuple(executions)), model.big_stages
        xs = tuple(ex.to_host(x) for x, ex in zip(shards, executions))
        hs = model.stages(path, model.stem(path, xs, True), 0, big, True)
        # the stages one engine would run in memory: one partition each (no budget), as there
        tail = Lockstep(tuple(ex.replace(max_partition_bytes=_UNBOUNDED) for ex in executions))
        hs = model.stages(tail, hs, big, 4, True)
        features = tuple(ex.to_compute(host.global_avg_pool(h, execution=ex))
                         for h, ex in zip(hs, executions))
        return features, nnx.state(model, nnx.BatchStat)

    return jax.vjp(forward, params, has_aux=True)


@functools.partial(jax.jit, static_argnames=("head_def", "loss_fn"))
def _aggregate(head_def, head_params, head_rest, features, label, loss_fn):
    return aggregate(head_def, head_params, head_rest, features, label, loss_fn)


def _tree_sum(trees, device):
    return functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), jax.device_put(trees, device))


def big_mesh_value_and_grad(encoder: BigResNet, head: nnx.Module, tiles, label, *,
                            executions: Sequence[Execution], sync_bn: bool = False,
                            loss_fn=slide_loss):
    """Slide loss and gradients with the tiles spread over N Big-Layers engines (one per execution).

    Args:
      encoder: a ``BigResNet``; its ``BatchStat``s are updated in place.
      head: a MIL aggregator, run on ``executions[0].compute`` (the aggregator rank).
      tiles: (n_tiles, H, W, 3) float32 host array; shard k gets ``ShardLayout(n, N).split`` part k.
      executions: one per shard, e.g. ``Execution(budget, compute=dev_k, host=cpu)``.
      sync_bn: BatchNorm over all tiles (lockstep engines, equal to one device) or per shard.
      loss_fn: ``loss_fn(head, features, label)`` -> scalar, as ``mesh_value_and_grad``'s.
    Returns:
      ``(loss, (encoder_grads, head_grads))`` on the aggregator device.
    """
    _check(encoder, sync_bn)
    layout = ShardLayout(len(tiles), len(executions))
    used = [(x, ex) for x, ex in zip(layout.split(np.asarray(tiles, np.float32)), executions) if len(x)]
    shards, exs = [x for x, _ in used], [ex for _, ex in used]  # a slide may have fewer tiles than N
    lead = exs[0].compute
    graphdef, params, stats = nnx.split(encoder, nnx.Param, nnx.BatchStat)
    head_def, head_params, head_rest = nnx.split(head, nnx.Param, ...)
    if sync_bn:
        features, pull, new_stats = _lockstep_forward(graphdef, params, stats, shards, exs)
    else:
        runs = [_replica_forward(graphdef, params, stats, x, ex) for x, ex in zip(shards, exs)]
        features = tuple(f for f, _, _ in runs)
        new_stats = _weighted_mean([s for _, _, s in runs], [len(x) for x in shards], lead)
    gathered = jnp.concatenate(jax.device_put(features, lead))                       # gather
    loss, g_head, g_features, head_rest = _aggregate(head_def, *jax.device_put(      # aggregate
        (head_params, head_rest), lead), gathered, label, loss_fn=loss_fn)
    bounds = np.cumsum([0] + [len(x) for x in shards])
    g_shards = [jax.device_put(g_features[a:b], ex.compute)                          # scatter
                for a, b, ex in zip(bounds[:-1], bounds[1:], exs)]
    if sync_bn:
        (g_encoder,) = pull(tuple(g_shards))
    else:
        g_encoder = _tree_sum([encoder_vjp(pull, f, g)                               # VJP, sum
                               for (f, pull, _), g in zip(runs, g_shards)], lead)
    nnx.update(encoder, new_stats)
    nnx.update(head, head_rest)
    return loss, (jax.device_put(g_encoder, lead), g_head)


def _weighted_mean(trees, weights, device):
    total = float(sum(weights))
    scaled = [jax.tree.map(lambda v, w=w: v * (w / total), t) for t, w in zip(trees, weights)]
    return _tree_sum(scaled, device)
