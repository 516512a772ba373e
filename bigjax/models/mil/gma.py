"""GMA: the gated MIL attention aggregator of Campanella et al.'s pathology benchmarks.

References:
    Campanella et al. A clinical benchmark of public self-supervised pathology foundation models.
    arXiv 2407.06508 (2024).
    Official code: https://github.com/fuchs-lab-public/OPAL (SSL_benchmarks/code/gma_training/
    modules.py) and https://github.com/fuchs-lab-public/CPath_SABenchmark (code/aggregator/gma.py).
"""

import jax
from flax import nnx

from bigjax.models.mil.abmil import AttentionScore
from bigjax.models.mil.init import xavier_linear


class GMA(nnx.Module):
    """Two-layer MLP embedding, gated attention, attention-weighted sum, linear classifier.

    Layout of the official `GMA(size_arg="big")`: `Linear(in_dim, 512) ReLU [Dropout]
    Linear(512, 512) ReLU [Dropout]`, gated attention with L=512, D=384 (dropout after the tanh and
    sigmoid branches), classifier `Linear(512, n_classes)`. The official modules.py re-initialises
    every `nn.Linear` as CLAM's `initialize_weights` (untruncated xavier_normal_ weights, zero
    biases): `xavier_linear`.

    Args:
        in_dim: size of each tile feature (`ndim` in the official code).
        n_classes: number of logits.
        rngs: parameter and dropout randomness.
        hidden: embedding size (512).
        attn_dim: attention hidden size (384 for "big", 256 for "small").
        dropout: rate on the embedding and attention branches when train=True; the official
            `dropout=True` means 0.25, its default `False` means 0.

    Returns (from __call__):
        {"logits": (n_classes,), "attention": (N,) softmax weights summing to 1}.
    """

    def __init__(self, in_dim: int, n_classes: int, *, rngs: nnx.Rngs, hidden: int = 512,
                 attn_dim: int = 384, dropout: float = 0.0):
        self.fc1 = xavier_linear(in_dim, hidden, rngs=rngs)
        self.fc2 = xavier_linear(hidden, hidden, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.score = AttentionScore(hidden, attn_dim, gated=True, dropout=dropout,
                                    linear=xavier_linear, rngs=rngs)
        self.classifier = xavier_linear(hidden, n_classes, rngs=rngs)

    def __call__(self, features: jax.Array, *, train: bool) -> dict:
        h = self.dropout(jax.nn.relu(self.fc1(features)), deterministic=not train)
        h = self.dropout(jax.nn.relu(self.fc2(h)), deterministic=not train)
        attention = jax.nn.softmax(self.score(h, train=train))
        return {"logits": self.classifier(attention @ h), "attention": attention}
