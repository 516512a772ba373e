"""The model of a run and its training steps: a tile encoder under a MIL aggregator.

``batch_loss`` is the mean bag loss of a batch of bags; ``jitted_step`` takes one gradient of it and
one (possibly accumulating) optimiser update in one ``nnx.jit`` function; ``eager_step`` does the same
for encoders that must run outside ``jit`` (Big-Layers), jitting only the update.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models import mil

__all__ = ["MILClassifier", "HEAD_ONLY", "batch_loss", "jitted_step", "eager_step"]

HEAD_ONLY = nnx.All(nnx.Param, nnx.PathContains("head"))  # what a frozen encoder's run trains


class MILClassifier(nnx.Module):
    """A tile encoder and a MIL aggregator (``head``): bag of tiles -> bag logits."""

    def __init__(self, encoder: nnx.Module, head: nnx.Module):
        self.encoder, self.head = encoder, head


def bag_features(encode: Callable, tiles: jax.Array) -> jax.Array:
    """(B, K, T, T, 3) tiles -> (B, K, D) features through ``encode`` on all B*K tiles at once."""
    b, k = tiles.shape[:2]
    return encode(tiles.reshape(b * k, *tiles.shape[2:])).reshape(b, k, -1)


def batch_loss(model: MILClassifier, feats: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean bag loss of a batch of bag features (B, K, D) under the model's aggregator."""
    losses = [mil.bag_loss(model.head(feats[i], train=True), labels[i]) for i in range(len(labels))]
    return jnp.mean(jnp.stack(losses))


def _tiles_loss(model, inputs, labels, encode: bool):
    feats = bag_features(lambda x: model.encoder(x, train=True), inputs) if encode else inputs
    return batch_loss(model, feats, labels)


@nnx.jit(static_argnames=("encode",))
def jitted_step(model, optimizer, inputs, labels, *, encode: bool):
    """One gradient and update, all jitted: of tiles through the encoder (``encode``) or of features.

    With features (``encode=False``) only the aggregator is differentiated, as its optimiser expects.
    """
    wrt = nnx.Param if encode else HEAD_ONLY
    grad_fn = nnx.value_and_grad(_tiles_loss, argnums=nnx.DiffState(0, wrt))
    loss, grads = grad_fn(model, inputs, labels, encode)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _apply_update(model, optimizer, grads):
    optimizer.update(model, grads)


def eager_step(model, optimizer, loss_fn: Callable, *args):
    """Gradient of ``loss_fn(model, *args)`` outside jit (host loops allowed), then a jitted update."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, *args)
    _apply_update(model, optimizer, grads)
    return loss
