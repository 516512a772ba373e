"""Per-tile scores of every MIL aggregator: where in the bag a trained head looked, tile by tile.

``tile_scores(head, features)`` calls the head in eval mode and returns named per-tile arrays:

- every head: ``attention`` (N,), the head's own "attention" output (sums to 1): ABMIL, gated ABMIL
  and GMA pool with it; TransMIL's is the class token's attention row in its last (second) layer,
  folded onto the tiles (``bigjax.models.mil.transmil``); DTFD's is each tile's weight in the tier-2
  bag feature; mean pooling's is uniform (1/N: it says nothing) and max pooling's the share of
  classes whose max the tile supplies.
- mean / max pooling: ``instance_logits`` (N, C), the per-tile logits they pool, and ``instance``
  (N,) = 1 - softmax(instance logits)[class 0], the tile's probability of not being the benign /
  normal class 0 (ISUP 0 for PANDA, normal for CAMELYON).
- DTFD: ``cam_logits`` (N, C), the tile CAMs of the official code (``get_cam_1d``: the tier-1
  classifier's weights, no bias, applied to each tile's tier-1-attention-weighted feature, pseudo-
  bags as in eval mode), and ``cam`` (N,) = 1 - softmax(CAM)[class 0] (for two classes this is the
  official code's last-class CAM probability).

Scores are computed from the heads' outputs and parameters; the heads themselves are not changed.
``default_score(head)`` names the score a heatmap draws unless asked otherwise.

References:
    Zhang et al. DTFD-MIL, CVPR 2022, https://github.com/hrzhang1123/DTFD-MIL (Main_DTFD_MIL.py:
    get_cam_1d, patch_pred_softmax); Wang et al. 2018 (instance-level pooling).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from bigjax.models.mil import dtfd
from bigjax.models.mil.pooling import MaxPool, MeanPool

__all__ = ["tile_scores", "score_names", "default_score", "informative_scores", "dtfd_cam", "as_columns"]


def score_names(head: nnx.Module) -> tuple[str, ...]:
    """The per-tile (N,) scores ``tile_scores`` gives for this head, the default first."""
    if isinstance(head, (MeanPool, MaxPool)):
        return ("instance", "attention")
    if isinstance(head, dtfd.DTFD):
        return ("cam", "attention")
    return ("attention",)


def default_score(head: nnx.Module) -> str:
    """The score drawn by default: instance scores where the head has them (mean/max pooling,
    DTFD's CAMs), else attention."""
    return score_names(head)[0]


def informative_scores(head: nnx.Module) -> tuple[str, ...]:
    """The scores that can tell tiles apart (mean pooling's attention is 1/N everywhere)."""
    return tuple(s for s in score_names(head) if not (s == "attention" and isinstance(head, MeanPool)))


def tile_scores(head: nnx.Module, features: jax.Array) -> dict[str, np.ndarray]:
    """Named per-tile scores of ``head`` on one bag's features (N, D), as numpy (see the module doc).

    Returns:
        {"logits": (C,), "attention": (N,), ...} with the head's extra scores.
    """
    out = head(features, train=False)
    scores = {"logits": np.asarray(out["logits"]), "attention": np.asarray(out["attention"])}
    if isinstance(head, (MeanPool, MaxPool)):
        logits = head.head(features, False)
        scores.update(instance_logits=np.asarray(logits), instance=_not_class0(logits))
    elif isinstance(head, dtfd.DTFD):
        cam = dtfd_cam(head, features)
        scores.update(cam_logits=np.asarray(cam), cam=_not_class0(cam))
    return scores


def dtfd_cam(head: dtfd.DTFD, features: jax.Array) -> jax.Array:
    """DTFD-MIL's tile CAMs (N, C): ``(a_i h_i) W1^T`` with a_i the tile's tier-1 attention in its
    eval-mode pseudo-bag, h_i its reduced feature and W1 the tier-1 classifier's weight (official
    ``get_cam_1d(classifier, tattFeats)``)."""
    h = jax.nn.relu(head.reduce(features))
    members = head._pseudo_bags(h.shape[0], False)
    attention = dtfd._group_softmax(head.score1(h, train=False), members)
    return (attention[:, None] * h) @ head.classifier1.kernel[...]


def _not_class0(logits: jax.Array) -> np.ndarray:
    return np.asarray(1.0 - jax.nn.softmax(logits, axis=-1)[:, 0], np.float64)


def as_columns(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-tile scores as 1-D columns: (N, C) arrays become ``name_0 .. name_{C-1}``."""
    columns = {}
    for name, value in scores.items():
        if name == "logits":
            continue
        if value.ndim == 2:
            columns.update({f"{name}_{c}": value[:, c] for c in range(value.shape[1])})
        else:
            columns[name] = value
    return columns

