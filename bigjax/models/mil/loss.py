"""The training loss of one bag under any MIL aggregator."""

import jax
import jax.numpy as jnp
import optax


# AttentionDeepMIL's calculate_objective clamps Y_prob to [1e-5, 1 - 1e-5] before the log.
BERNOULLI_CLAMP = 1e-5


def bag_loss(out: dict, label: jax.Array | int) -> jax.Array:
    """Cross-entropy of the bag logits plus the mean cross-entropy of any auxiliary predictions.

    A head with a "bernoulli_prob" output (the official one-class ABMIL) is trained instead with
    the official negative log Bernoulli likelihood `-(y log p + (1 - y) log(1 - p))` of p =
    clamp(Y_prob, 1e-5, 1 - 1e-5) (AttentionDeepMIL model.py `calculate_objective`; the clamp
    also stops the gradient where it binds, as torch.clamp does).

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
        Zhang et al. CVPR 2022, https://github.com/hrzhang1123/DTFD-MIL (Main_DTFD_MIL.py);
        Ilse et al. ICML 2018, https://github.com/AMLab-Amsterdam/AttentionDeepMIL (model.py).
    """
    if "bernoulli_prob" in out:
        p = jnp.clip(out["bernoulli_prob"], BERNOULLI_CLAMP, 1.0 - BERNOULLI_CLAMP)
        y = jnp.asarray(label, p.dtype)
        return -(y * jnp.log(p) + (1.0 - y) * jnp.log(1.0 - p))
    label = jnp.asarray(label, jnp.int32)
    loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], label)
    if "aux_logits" in out:
        aux = out["aux_logits"]
        labels = jnp.broadcast_to(label, aux.shape[:1])
        loss = loss + optax.softmax_cross_entropy_with_integer_labels(aux, labels).mean()
    return loss
