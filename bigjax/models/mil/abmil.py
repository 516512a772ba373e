"""Attention-based deep MIL (ABMIL) and its gated variant.

The attention scorer here (`AttentionScore`) is also the tier-1/tier-2 scorer of DTFD-MIL and the
scorer of GMA: all three use Ilse et al.'s `w^T (tanh(V h) * sigm(U h))` form.

References:
    Ilse, Tomczak, Welling. Attention-based Deep Multiple Instance Learning. ICML 2018.
    Official code: https://github.com/AMLab-Amsterdam/AttentionDeepMIL (model.py).
"""

import jax
import jax.numpy as jnp
from flax import nnx


class AttentionScore(nnx.Module):
    """Unnormalised attention score per instance, plain or gated.

    plain: `w^T tanh(V h)`; gated: `w^T (tanh(V h) * sigmoid(U h))` (Ilse et al. eq. 8 and 9).

    Args:
        dim: instance embedding size L.
        hidden: attention hidden size D.
        gated: use the sigmoid gate U.
        dropout: rate applied to each branch after its nonlinearity (CLAM/GMA place it there);
            0 disables it, as in Ilse et al.
        kernel_init: initialiser of the three linear maps.
        rngs: parameter and dropout randomness.
    """

    def __init__(self, dim: int, hidden: int, *, gated: bool, dropout: float = 0.0,
                 kernel_init=nnx.initializers.lecun_normal(), rngs: nnx.Rngs):
        self.tanh_branch = nnx.Linear(dim, hidden, kernel_init=kernel_init, rngs=rngs)
        self.gate_branch = (nnx.Linear(dim, hidden, kernel_init=kernel_init, rngs=rngs)
                            if gated else None)
        self.weights = nnx.Linear(hidden, 1, kernel_init=kernel_init, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, h: jax.Array, *, train: bool) -> jax.Array:
        """Scores (N,) for embeddings h (N, dim); softmax over them gives the attention."""
        a = self.dropout(jnp.tanh(self.tanh_branch(h)), deterministic=not train)
        if self.gate_branch is not None:
            a = a * self.dropout(jax.nn.sigmoid(self.gate_branch(h)), deterministic=not train)
        return self.weights(a)[:, 0]


class ABMIL(nnx.Module):
    """Attention MIL pooling: embed, score, softmax over the bag, weighted sum, classify.

    Structure and sizes as the official code: a `Linear(in_dim, L) + ReLU` embedding (the second
    half of its feature extractor), attention `L -> D -> 1`, classifier `Linear(L, n_classes)`
    (softmax logits instead of the binary sigmoid), with L=500, D=128, K=1 attention branch.

    Args:
        in_dim: size of each tile feature.
        n_classes: number of logits.
        rngs: parameter and dropout randomness.
        hidden: embedding size L.
        attn_dim: attention hidden size D.
        gated: gated attention (Ilse et al. eq. 9).
        dropout: rate on the embedding and attention branches, only when train=True
            (0 as in the official code).

    Returns (from __call__):
        {"logits": (n_classes,), "attention": (N,) softmax weights summing to 1}.

    References:
        Ilse et al., ICML 2018; https://github.com/AMLab-Amsterdam/AttentionDeepMIL.
    """

    def __init__(self, in_dim: int, n_classes: int, *, rngs: nnx.Rngs, hidden: int = 500,
                 attn_dim: int = 128, gated: bool = False, dropout: float = 0.0):
        self.embed = nnx.Linear(in_dim, hidden, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.score = AttentionScore(hidden, attn_dim, gated=gated, dropout=dropout, rngs=rngs)
        self.classifier = nnx.Linear(hidden, n_classes, rngs=rngs)

    def __call__(self, features: jax.Array, *, train: bool) -> dict:
        h = self.dropout(jax.nn.relu(self.embed(features)), deterministic=not train)
        attention = jax.nn.softmax(self.score(h, train=train))
        return {"logits": self.classifier(attention @ h), "attention": attention}


class GatedABMIL(ABMIL):
    """ABMIL with the gated attention of Ilse et al. eq. 9 (same sizes, same outputs).

    References:
        Ilse et al., ICML 2018; https://github.com/AMLab-Amsterdam/AttentionDeepMIL.
    """

    def __init__(self, in_dim: int, n_classes: int, *, rngs: nnx.Rngs, **kwargs):
        super().__init__(in_dim, n_classes, rngs=rngs, gated=True, **kwargs)
