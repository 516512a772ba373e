"""Mean and max pooling MIL baselines over per-tile predictions.

Both score every tile with the same small MLP, `Linear(in_dim, 512) ReLU [Dropout]
Linear(512, n_classes)`, and pool the per-tile logits over the bag (instance-level pooling, the
"mi-Net" form of Wang et al.), as the Mean-/Max-pooling baselines the MIL papers report. These
baselines have no official PyTorch code of their own; their layers take PyTorch's `nn.Linear`
defaults like the other heads (`bigjax.models.mil.init.torch_linear`).

References:
    Wang, Yan, Tang, Bai, Liu. Revisiting multiple instance neural networks.
    Pattern Recognition 2018.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models.mil.init import torch_linear


class _InstanceHead(nnx.Module):
    """Per-tile logits: `Linear(in_dim, hidden) ReLU Dropout Linear(hidden, n_classes)`."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int, dropout: float, rngs: nnx.Rngs):
        self.fc1 = torch_linear(in_dim, hidden, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.fc2 = torch_linear(hidden, n_classes, rngs=rngs)

    def __call__(self, features: jax.Array, train: bool) -> jax.Array:
        h = self.dropout(jax.nn.relu(self.fc1(features)), deterministic=not train)
        return self.fc2(h)


class MeanPool(nnx.Module):
    """Bag logits are the mean of the tile logits; attention is uniform, 1/N per tile.

    Args:
        in_dim: size of each tile feature.
        n_classes: number of logits.
        rngs: parameter and dropout randomness.
        hidden: MLP hidden size.
        dropout: rate after the hidden layer when train=True.

    Returns (from __call__):
        {"logits": (n_classes,), "attention": (N,) all 1/N}.
    """

    def __init__(self, in_dim: int, n_classes: int, *, rngs: nnx.Rngs, hidden: int = 512,
                 dropout: float = 0.0):
        self.head = _InstanceHead(in_dim, n_classes, hidden, dropout, rngs)

    def __call__(self, features: jax.Array, *, train: bool) -> dict:
        tile_logits = self.head(features, train)
        n = features.shape[0]
        return {"logits": tile_logits.mean(axis=0), "attention": jnp.full((n,), 1.0 / n)}


class MaxPool(nnx.Module):
    """Bag logit of each class is the max of that class's tile logits.

    The "attention" of a tile is the share of classes whose max it supplies (sums to 1): the tiles
    a max-pooling model looks at, and only those, get weight.

    Args:
        in_dim: size of each tile feature.
        n_classes: number of logits.
        rngs: parameter and dropout randomness.
        hidden: MLP hidden size.
        dropout: rate after the hidden layer when train=True.

    Returns (from __call__):
        {"logits": (n_classes,), "attention": (N,) summing to 1}.
    """

    def __init__(self, in_dim: int, n_classes: int, *, rngs: nnx.Rngs, hidden: int = 512,
                 dropout: float = 0.0):
        self.head = _InstanceHead(in_dim, n_classes, hidden, dropout, rngs)

    def __call__(self, features: jax.Array, *, train: bool) -> dict:
        tile_logits = self.head(features, train)
        winners = jnp.argmax(tile_logits, axis=0)  # (n_classes,)
        n, n_classes = tile_logits.shape
        attention = jnp.zeros((n,)).at[winners].add(1.0 / n_classes)
        return {"logits": tile_logits.max(axis=0), "attention": attention}
