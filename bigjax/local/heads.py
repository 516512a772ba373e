"""The classifiers of local training: A_i after modules 1..K−1 and H after module K.

Both are the official code's ``AuxClassifier`` in its ``1c2f`` form: a k×k conv with stride k (no
bias) that shrinks the feature map, GroupNorm with one group per channel, ReLU, gated-attention MIL
pooling over the remaining positions (Ilse et al.'s scorer from ``bigjax.models.mil``, dropout 0.2
on the attention weights), then Linear → ReLU → Linear to the class logits. The auxiliary heads use
k = 9 (64 and 128 channels) or 7 (256), an attention width of C/2 and a 128-wide hidden layer; H uses
k = 5, attention width 128 and a 512-wide hidden layer.

On a Big path the k×k conv is a partitioned Big-Layers conv of the host feature map; what it leaves
(k² times smaller) goes to the compute device for the rest of the head.

References:
    Zhang et al., MICCAI 2022; official code cvlab-stonybrook/local_learning_wsi
    (network/auxiliary_classifier.py, network/pooling.py ``GatedAttentionPooling``, main.py).
    Ilse et al., "Attention-based Deep Multiple Instance Learning", ICML 2018.
"""

from __future__ import annotations

import jax
from flax import nnx

from bigjax.layers.modules import BigConv
from bigjax.models.mil.abmil import AttentionScore

__all__ = ["GatedAttentionHead", "aux_head", "final_head", "AUX_KERNEL"]

# the official auxiliary heads' conv kernel (= stride) by the module's output channels
AUX_KERNEL = {64: 9, 128: 9, 256: 7}


class GatedAttentionHead(nnx.Module):
    """Reduce (k×k/k conv, GroupNorm, ReLU), gated-attention pool the positions, classify.

    Args:
      channels: channels of the feature map it reads.
      n_classes: number of logits.
      kernel: side and stride of the reducing conv.
      attn_dim: hidden width of the gated attention.
      hidden: width of the hidden linear layer.
      dropout: rate on the attention weights (training only).
    """

    def __init__(self, channels: int, n_classes: int, *, kernel: int, attn_dim: int, hidden: int,
                 dropout: float = 0.2, rngs: nnx.Rngs):
        self.reduce = BigConv(channels, channels, kernel, stride=kernel, rngs=rngs)
        self.norm = nnx.GroupNorm(channels, num_groups=channels, epsilon=1e-5, rngs=rngs)
        self.score = AttentionScore(channels, attn_dim, gated=True, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.fc1 = nnx.Linear(channels, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, n_classes, rngs=rngs)
        self.kernel = kernel

    def positions(self, path, x) -> jax.Array:
        """The reduced map's positions as instances (N, C) on the compute device."""
        if x.shape[0] != 1 or min(x.shape[1:3]) < self.kernel:
            raise ValueError(f"a head reads one slide's map (batch 1) at least {self.kernel}x"
                             f"{self.kernel} (its reducing conv), got shape {tuple(x.shape)}; "
                             "give a smaller head kernel for small inputs")
        ex = getattr(path, "execution", None)
        h = self.reduce.plain(x) if ex is None else ex.to_compute(self.reduce(x, execution=ex))
        if h.shape[1] * h.shape[2] == 1:
            raise ValueError(f"a {x.shape[1]}x{x.shape[2]} map leaves this head's {self.kernel}x"
                             f"{self.kernel}/{self.kernel} conv one position, whose per-channel "
                             "GroupNorm is 0: the head could not learn; give larger slides (or a "
                             "higher magnification)")
        h = jax.nn.relu(self.norm(h))
        return h.reshape(-1, h.shape[-1])

    def __call__(self, path, x, *, train: bool) -> jax.Array:
        """Class logits (n_classes,) of feature map ``x`` (1, H, W, C), run through ``path``."""
        h = self.positions(path, x)
        attention = self.dropout(jax.nn.softmax(self.score(h, train=train)),
                                 deterministic=not train)
        m = attention @ h
        return self.fc2(jax.nn.relu(self.fc1(m)))


def aux_head(channels: int, n_classes: int, *, kernel: int | None = None,
             rngs: nnx.Rngs) -> GatedAttentionHead:
    """A_i with the official sizes (``kernel`` overrides the conv side, e.g. for tiny inputs)."""
    if kernel is None and channels not in AUX_KERNEL:
        raise ValueError(f"no official auxiliary-head kernel for {channels} channels (only for "
                         f"{sorted(AUX_KERNEL)}); give one")
    return GatedAttentionHead(channels, n_classes, kernel=kernel or AUX_KERNEL[channels],
                              attn_dim=channels // 2, hidden=128, rngs=rngs)


def final_head(n_classes: int, *, channels: int = 512, kernel: int = 5,
               rngs: nnx.Rngs) -> GatedAttentionHead:
    """H, the classifier after the last stage (512 channels in ResNet-34), official sizes."""
    return GatedAttentionHead(channels, n_classes, kernel=kernel, attn_dim=128, hidden=channels,
                              rngs=rngs)
