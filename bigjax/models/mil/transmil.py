"""TransMIL: transformer MIL with Nyström attention and the PPEG positional encoding.

References:
    Shao et al. TransMIL: Transformer based correlated multiple instance learning for whole slide
    image classification. NeurIPS 2021. Official code: https://github.com/szc19990412/TransMIL
    (models/TransMIL.py).

Initialisation: the official code sets none, so every Linear and Conv2d (its own and those of
the nystrom-attention module) has PyTorch's defaults (`bigjax.models.mil.init`), LayerNorms are
ones and zeros, and the class token is `torch.randn`.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models.mil.init import torch_conv, torch_linear
from bigjax.models.mil.nystrom import NystromAttention

# torch.nn.LayerNorm's default, which the official code uses.
_LN_EPS = 1e-5


class TransLayer(nnx.Module):
    """Pre-norm residual Nyström attention, `x + attn(LayerNorm(x))` (no feed-forward block).

    Official sizes: dim_head = dim // 8, 8 heads, dim // 2 landmarks, 6 pinv iterations, value
    residual conv, dropout 0.1.

    Returns (from __call__):
        (tokens (n, dim), attention row of token 0 over the n tokens).
    """

    def __init__(self, dim: int, *, heads: int, dropout: float, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, epsilon=_LN_EPS, rngs=rngs)
        self.attn = NystromAttention(dim, heads=heads, dim_head=dim // heads,
                                     n_landmarks=dim // 2, dropout=dropout, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        out, first_row = self.attn(self.norm(x), train=train)
        return x + out, first_row


class PPEG(nnx.Module):
    """Pyramid position encoding generator: identity + depthwise 7x7, 5x5 and 3x3 convs on the grid.

    The class token (row 0) passes through unchanged; the other tokens fill a side x side grid in
    row-major order.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.convs = nnx.List([
            torch_conv(dim, dim, (k, k), padding=k // 2, groups=dim, rngs=rngs)
            for k in (7, 5, 3)
        ])

    def __call__(self, x: jax.Array, side: int) -> jax.Array:
        grid = x[1:].reshape(1, side, side, x.shape[-1])
        grid = grid + sum(conv(grid) for conv in self.convs)
        return jnp.concatenate([x[:1], grid.reshape(side * side, -1)])


class TransMIL(nnx.Module):
    """Project, square-pad, prepend a class token, attend, PPEG, attend, classify the class token.

    Args:
        in_dim: size of each tile feature.
        n_classes: number of logits.
        rngs: parameter and dropout randomness.
        dim: token size (512).
        heads: attention heads (8).
        dropout: attention output dropout when train=True (0.1).

    Returns (from __call__):
        {"logits": (n_classes,), "attention": (N,)}. The attention is the class token's row of
        the second layer's (Nyström-approximated) attention, folded back onto the N tiles (a
        padded copy adds to its source tile), negative entries of the approximation set to 0,
        and normalised to sum to 1 — an inspection aid, not a quantity the model pools with.
    """

    def __init__(self, in_dim: int, n_classes: int, *, rngs: nnx.Rngs, dim: int = 512,
                 heads: int = 8, dropout: float = 0.1):
        self.fc1 = torch_linear(in_dim, dim, rngs=rngs)
        # torch.randn init, as the official nn.Parameter(torch.randn(1, 1, 512))
        self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, dim)))
        self.layer1 = TransLayer(dim, heads=heads, dropout=dropout, rngs=rngs)
        self.pos_layer = PPEG(dim, rngs=rngs)
        self.layer2 = TransLayer(dim, heads=heads, dropout=dropout, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, epsilon=_LN_EPS, rngs=rngs)
        self.fc2 = torch_linear(dim, n_classes, rngs=rngs)

    def __call__(self, features: jax.Array, *, train: bool) -> dict:
        n = features.shape[0]
        side = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
        # Square padding repeats the first tokens (the official h[:, :add_length]); the modulo
        # keeps it defined for any n.
        source = jnp.arange(side * side) % n
        h = jax.nn.relu(self.fc1(features))[source]
        h = jnp.concatenate([self.cls_token[...], h])
        h, _ = self.layer1(h, train=train)
        h = self.pos_layer(h, side)
        h, cls_row = self.layer2(h, train=train)
        logits = self.fc2(self.norm(h)[0])
        return {"logits": logits, "attention": _tile_attention(cls_row[1:], source, n)}


def _tile_attention(token_weights: jax.Array, source: jax.Array, n: int) -> jax.Array:
    """Fold weights of the padded token grid onto the n tiles; clip at 0 and normalise."""
    weights = jnp.maximum(jnp.zeros((n,)).at[source].add(token_weights), 0.0)
    return weights / jnp.maximum(weights.sum(), 1e-12)
