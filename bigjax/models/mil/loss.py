"""The training loss of one bag under any MIL aggregator."""

import jax
import jax.numpy as jnp
import optax


def bag_loss(out: dict, label: jax.Array | int) -> jax.Array:
    """Cross-entropy of the bag logits plus the mean cross-entropy of any auxiliary predictions.

    DTFD-MIL's `aux_logits` are its tier-1 pseudo-bag predictions, each trained with the bag label:
    the official code minimises loss0 = mean over pseudo-bags of their cross-entropy with the
    tier-1 optimiser and loss1 = the bag cross-entropy with the tier-2 optimiser, both at the same
    learning rate and weight 1. With the tier-2 input detached (DTFD's default here), the
    gradient of `loss1 + loss0` is exactly those two gradients on their disjoint parameter sets.

    Args:
        out: an aggregator's output: "logits" (n_classes,), optional "aux_logits" (M, n_classes).
        label: the bag's integer class.

    Returns:
        the scalar loss.

    References:
        Zhang et al. CVPR 2022, https://github.com/hrzhang1123/DTFD-MIL (Main_DTFD_MIL.py).
    """
    label = jnp.asarray(label, jnp.int32)
    loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], label)
    if "aux_logits" in out:
        aux = out["aux_logits"]
        labels = jnp.broadcast_to(label, aux.shape[:1])
        loss = loss + optax.softmax_cross_entropy_with_integer_labels(aux, labels).mean()
    return loss
