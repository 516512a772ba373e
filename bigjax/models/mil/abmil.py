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

from bigjax.models.mil.init import torch_linear

OBJECTIVES = ("softmax", "bernoulli")


class AttentionScore(nnx.Module):
    """Unnormalised attention score per instance, plain or gated.

    plain: `w^T tanh(V h)`; gated: `w^T (tanh(V h) * sigmoid(U h))` (Ilse et al. eq. 8 and 9).

    Args:
        dim: instance embedding size L.
        hidden: attention hidden size D.
        gated: use the sigmoid gate U.
        dropout: rate applied to each branch after its nonlinearity (CLAM/GMA place it there);
            0 disables it, as in Ilse et al.
        linear: builds each of the three linear maps as `linear(in, out, rngs=rngs)`, so with
            the initialisation of the caller's official code (`bigjax.models.mil.init`); flax's
            default `nnx.Linear` unless given.
        rngs: parameter and dropout randomness.
    """

    def __init__(self, dim: int, hidden: int, *, gated: bool, dropout: float = 0.0,
                 linear=nnx.Linear, rngs: nnx.Rngs):
        self.tanh_branch = linear(dim, hidden, rngs=rngs)
        self.gate_branch = linear(dim, hidden, rngs=rngs) if gated else None
        self.weights = linear(hidden, 1, rngs=rngs)
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
    half of its feature extractor), attention `L -> D -> 1`, with L=500, D=128, K=1 attention
    branch. Every layer is initialised as the official model.py leaves them: PyTorch's
    `nn.Linear` defaults, weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (`torch_linear`).

    Objectives: "softmax" (default) classifies with `Linear(L, n_classes)` and the cross-entropy
    of `bag_loss`; "bernoulli" is the official binary head, `Linear(L, 1)` and a sigmoid
    (`Y_prob`), trained with the official clamped negative log Bernoulli likelihood
    (`calculate_objective`, `bag_loss`). It needs n_classes=2 and reports its logits as
    `(0, z)`, whose softmax is exactly `(1 - Y_prob, Y_prob)`, so evaluation and prediction
    read it like any two-class head.

    Args:
        in_dim: size of each tile feature.
        n_classes: number of logits.
        rngs: parameter and dropout randomness.
        hidden: embedding size L.
        attn_dim: attention hidden size D.
        gated: gated attention (Ilse et al. eq. 9).
        dropout: rate on the embedding and attention branches, only when train=True
            (0 as in the official code).
        objective: "softmax" or "bernoulli" (see above).

    Returns (from __call__):
        {"logits": (n_classes,), "attention": (N,) softmax weights summing to 1}, and with the
        Bernoulli objective also "bernoulli_prob": () the official `Y_prob`.

    References:
        Ilse et al., ICML 2018; https://github.com/AMLab-Amsterdam/AttentionDeepMIL (model.py:
        `Attention`, `GatedAttention`, `calculate_objective`).
    """

    def __init__(self, in_dim: int, n_classes: int, *, rngs: nnx.Rngs, hidden: int = 500,
                 attn_dim: int = 128, gated: bool = False, dropout: float = 0.0,
                 objective: str = "softmax"):
        if objective not in OBJECTIVES:
            raise ValueError(f"ABMIL objective={objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if objective == "bernoulli" and n_classes != 2:
            raise ValueError(f"the Bernoulli ABMIL is a binary head: {n_classes} classes "
                             f"need the softmax objective")
        self.bernoulli = objective == "bernoulli"
        self.embed = torch_linear(in_dim, hidden, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.score = AttentionScore(hidden, attn_dim, gated=gated, dropout=dropout,
                                    linear=torch_linear, rngs=rngs)
        self.classifier = torch_linear(hidden, 1 if self.bernoulli else n_classes, rngs=rngs)

    def __call__(self, features: jax.Array, *, train: bool) -> dict:
        h = self.dropout(jax.nn.relu(self.embed(features)), deterministic=not train)
        attention = jax.nn.softmax(self.score(h, train=train))
        logits = self.classifier(attention @ h)
        if not self.bernoulli:
            return {"logits": logits, "attention": attention}
        return {"logits": jnp.concatenate([jnp.zeros_like(logits), logits]),
                "bernoulli_prob": jax.nn.sigmoid(logits[0]), "attention": attention}


class GatedABMIL(ABMIL):
    """ABMIL with the gated attention of Ilse et al. eq. 9 (same sizes, init and outputs).

    References:
        Ilse et al., ICML 2018; https://github.com/AMLab-Amsterdam/AttentionDeepMIL.
    """

    def __init__(self, in_dim: int, n_classes: int, *, rngs: nnx.Rngs, **kwargs):
        super().__init__(in_dim, n_classes, rngs=rngs, gated=True, **kwargs)


class BernoulliABMIL(ABMIL):
    """The official one-class ABMIL: sigmoid output, negative log Bernoulli likelihood (n_classes=2).

    References:
        https://github.com/AMLab-Amsterdam/AttentionDeepMIL (model.py `Attention`).
    """

    def __init__(self, in_dim: int, n_classes: int, *, rngs: nnx.Rngs, **kwargs):
        super().__init__(in_dim, n_classes, rngs=rngs, objective="bernoulli", **kwargs)


class BernoulliGatedABMIL(ABMIL):
    """The official one-class gated ABMIL (model.py `GatedAttention`), as `BernoulliABMIL`."""

    def __init__(self, in_dim: int, n_classes: int, *, rngs: nnx.Rngs, **kwargs):
        super().__init__(in_dim, n_classes, rngs=rngs, gated=True, objective="bernoulli",
                         **kwargs)
