"""DTFD-MIL: double-tier feature distillation over pseudo-bags.

Tier 1 splits the bag into M pseudo-bags, pools each with gated attention and classifies it
(those M predictions are trained with the bag label: `aux_logits`); feature distillation picks one
or a few features per pseudo-bag; tier 2 pools the distilled features with gated attention and
classifies the bag.

References:
    Zhang et al. DTFD-MIL: Double-tier feature distillation multiple instance learning for
    histopathology whole slide image classification. CVPR 2022.
    Official code: https://github.com/hrzhang1123/DTFD-MIL (Main_DTFD_MIL.py, Model/).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.models.mil.abmil import AttentionScore
from bigjax.models.mil.init import torch_linear

DISTILL_TYPES = ("AFS", "MaxMinS", "MaxS")


class DTFD(nnx.Module):
    """DTFD-MIL for one bag, with the official code's sizes and defaults.

    DimReduction `Linear(in_dim, 512, bias=False) ReLU` (numLayer_Res=0), tier-1 gated attention
    (L=512, D=128) and classifier `[Dropout] Linear(512, n_classes)`, tier-2 gated attention and
    classifier of the same sizes, numGroup=4 pseudo-bags, distill="AFS", and total_instance=4
    (one max and one min instance per pseudo-bag for MaxMinS).

    Pseudo-bags: with train=True, as the official `random.shuffle` + `np.array_split(index, M)`:
    a random permutation (from the module's `dropout` RNG stream) cut into M consecutive chunks,
    the first N mod M of them one tile longer; with train=False the split is the deterministic
    round-robin of tile order (tile i to pseudo-bag i mod M), of the same sizes. There are always
    M pseudo-bags: a bag of N < M tiles has M - N empty ones, which, as in the official loop,
    have the zero feature (the sum over no tiles), predict the classifier's bias and are trained
    with the bag label (`aux_logits` is always (M, n_classes)); under AFS their zero features
    enter tier 2, under MaxMinS/MaxS they give no instance. MaxMinS/MaxS take the
    min(k, size) highest (and lowest) instances of each pseudo-bag (`sort_idx[:k]`,
    `sort_idx[-k:]`; a one-tile pseudo-bag gives its tile twice under MaxMinS).

    Initialisation: DTFD-MIL's Model/network.py and Model/Attention.py set none, so every layer
    has PyTorch's `nn.Linear` defaults (`torch_linear`).

    Training, as the official code: tier 1 (reduction, attention, classifier) learns only from
    the pseudo-bag losses and tier 2 only from the bag loss. The official code gets this with two
    optimisers and `retain_graph`; here the distilled features enter tier 2 through
    `stop_gradient` (`detach_tier2=True`), so the sum `bag_loss` gives both tiers exactly their
    official gradients.

    Args:
        in_dim: size of each tile feature.
        n_classes: number of logits.
        rngs: parameters, dropout and the pseudo-bag split ('dropout' stream, or 'default').
        dim: reduced feature size (mDim, 512).
        attn_dim: attention hidden size (128).
        n_groups: number of pseudo-bags M (numGroup, 4).
        distill: "AFS" (attention-pooled feature of each pseudo-bag), "MaxMinS" (features of the
            instances with the highest and lowest last-class probability) or "MaxS" (highest only).
        instances_per_group: instances MaxMinS/MaxS take at each end
            (total_instance // numGroup).
        dropout: tier-1 classifier dropout (droprate, 0).
        dropout_tier2: tier-2 classifier dropout (droprate_2, 0).
        detach_tier2: stop tier-2 gradients at the distilled features (see above).

    Returns (from __call__):
        {"logits": (n_classes,) tier-2 bag prediction, "aux_logits": (M, n_classes) tier-1
        pseudo-bag predictions, "attention": (N,) weight of each tile in the tier-2 bag feature,
        summing to 1 (AFS: tier-2 weight of its pseudo-bag times its tier-1 weight in it;
        MaxMinS/MaxS: tier-2 weight of its distilled copies, 0 for tiles not distilled); with
        empty pseudo-bags under AFS their zero features' tier-2 weight belongs to no tile, and
        the tile weights are renormalised to sum to 1}.
    """

    def __init__(self, in_dim: int, n_classes: int, *, rngs: nnx.Rngs, dim: int = 512,
                 attn_dim: int = 128, n_groups: int = 4, distill: str = "AFS",
                 instances_per_group: int = 1, dropout: float = 0.0, dropout_tier2: float = 0.0,
                 detach_tier2: bool = True):
        if distill not in DISTILL_TYPES:
            raise ValueError(f"DTFD distill={distill!r}; choose one of {', '.join(DISTILL_TYPES)}")
        self.n_groups, self.distill = n_groups, distill
        self.instances_per_group, self.detach_tier2 = instances_per_group, detach_tier2
        self.reduce = torch_linear(in_dim, dim, use_bias=False, rngs=rngs)
        self.score1 = AttentionScore(dim, attn_dim, gated=True, linear=torch_linear, rngs=rngs)
        self.dropout1 = nnx.Dropout(dropout, rngs=rngs)
        self.classifier1 = torch_linear(dim, n_classes, rngs=rngs)
        self.score2 = AttentionScore(dim, attn_dim, gated=True, linear=torch_linear, rngs=rngs)
        self.dropout2 = nnx.Dropout(dropout_tier2, rngs=rngs)
        self.classifier2 = torch_linear(dim, n_classes, rngs=rngs)
        self.split_rng = rngs["dropout"].fork()

    def __call__(self, features: jax.Array, *, train: bool) -> dict:
        h = jax.nn.relu(self.reduce(features))  # (N, dim)
        members = self._pseudo_bags(h.shape[0], train)  # (M, N) one-hot
        tier1_attention = _group_softmax(self.score1(h, train=train), members)  # (N,)
        weighted = tier1_attention[:, None] * h
        pseudo_features = members @ weighted  # (M, dim)
        aux_logits = self.classifier1(self.dropout1(pseudo_features, deterministic=not train))

        if self.distill == "AFS":
            distilled, tile_index = pseudo_features, None
        else:
            tile_index = self._distilled_tiles(weighted, members)  # (M * k,)
            distilled = h[tile_index]
        if self.detach_tier2:
            distilled = jax.lax.stop_gradient(distilled)

        tier2_attention = jax.nn.softmax(self.score2(distilled, train=train))
        bag_feature = tier2_attention @ distilled
        logits = self.classifier2(self.dropout2(bag_feature, deterministic=not train))

        if tile_index is None:
            attention = (tier2_attention @ members) * tier1_attention
            attention = attention / attention.sum()  # 1 unless empty pseudo-bags took a share
        else:
            attention = jnp.zeros(h.shape[0]).at[tile_index].add(tier2_attention)
        return {"logits": logits, "aux_logits": aux_logits, "attention": attention}

    def _pseudo_bags(self, n: int, train: bool) -> jax.Array:
        """One-hot membership (M, n): array_split chunks of a random order if train, else
        round-robin; pseudo-bags beyond the n-th are empty when n < M."""
        if not train:
            group_of_tile = jnp.arange(n) % self.n_groups
        else:
            order = jax.random.permutation(self.split_rng(), n)
            chunk_of_position = np.repeat(np.arange(self.n_groups), group_sizes(n, self.n_groups))
            group_of_tile = jnp.zeros(n, jnp.int32).at[order].set(chunk_of_position)
        return (group_of_tile[None, :] == jnp.arange(self.n_groups)[:, None]).astype(jnp.float32)

    def _distilled_tiles(self, weighted: jax.Array, members: jax.Array) -> jax.Array:
        """Tile indices MaxMinS/MaxS keep: per pseudo-bag, highest (and lowest) last-class CAM.

        The score is the official get_cam_1d: the tier-1 classifier weights (no bias) applied to
        each attention-weighted instance feature, softmax over classes, last class's probability.
        """
        n_groups, n = members.shape
        sizes = group_sizes(n, n_groups)
        k = min(self.instances_per_group, int(sizes.max()))
        # the official sort_idx[:k] of a pseudo-bag of s tiles keeps min(k, s) of them
        rows = np.concatenate([np.full(min(k, s), g) for g, s in enumerate(sizes)]).astype(int)
        ranks = np.concatenate([np.arange(min(k, s)) for s in sizes]).astype(int)
        cam = weighted @ self.classifier1.kernel[...]  # (N, n_classes)
        prob_last = jax.lax.stop_gradient(jax.nn.softmax(cam)[:, -1])
        in_group = members > 0
        _, top = jax.lax.top_k(jnp.where(in_group, prob_last, -jnp.inf), k)  # (M, k)
        if self.distill == "MaxS":
            return top[rows, ranks]
        _, bottom = jax.lax.top_k(jnp.where(in_group, -prob_last, -jnp.inf), k)
        return jnp.concatenate([top[rows, ranks], bottom[rows, ranks]])


def group_sizes(n: int, n_groups: int) -> np.ndarray:
    """Sizes of np.array_split(range(n), n_groups): the first n mod M chunks one longer (0 if n < M)."""
    return n // n_groups + (np.arange(n_groups) < n % n_groups)


def _group_softmax(scores: jax.Array, members: jax.Array) -> jax.Array:
    """Softmax of scores (N,) within each pseudo-bag of the one-hot members (M, N).

    Masked with the lowest finite value, not -inf: an empty pseudo-bag's row then stays finite
    (uniform, zeroed by the mask) instead of 0/0, in value and gradient.
    """
    masked = jnp.where(members > 0, scores[None, :], jnp.finfo(scores.dtype).min)
    return (jax.nn.softmax(masked, axis=1) * members).sum(axis=0)
