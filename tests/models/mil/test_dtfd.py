"""DTFD-MIL: pseudo-bags, distillation, attention bookkeeping and the tier-wise gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tests.models.mil.helpers import IN_DIM, N_CLASSES, bag, forward, make
from flax import nnx

from bigjax.models.mil import build


def _reduced(model, x):
    return jax.nn.relu(x @ model.reduce.kernel[...])


def test_afs_attention_is_the_bag_feature_weighting():
    model, x = make("dtfd"), bag(7)
    out = forward(model, x, False)
    bag_feature = out["attention"] @ _reduced(model, x)
    expected = bag_feature @ model.classifier2.kernel[...] + model.classifier2.bias[...]
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-6)


def test_eval_split_is_round_robin_and_train_split_is_random():
    model = make("dtfd")
    np.testing.assert_array_equal(model._pseudo_bags(7, train=False).argmax(0),
                                  np.arange(7) % 4)
    splits = [np.asarray(model._pseudo_bags(7, train=True)) for _ in range(3)]
    for members in splits:  # every tile in exactly one pseudo-bag, sizes as np.array_split
        np.testing.assert_array_equal(members.sum(0), np.ones(7))
        np.testing.assert_array_equal(members.sum(1), [len(c) for c in np.array_split(range(7), 4)])
    assert not all(np.array_equal(splits[0], s) for s in splits[1:])


@pytest.mark.parametrize("distill, per_tile", [("MaxMinS", 2), ("MaxS", 1)])
def test_instance_distillation_keeps_k_tiles_per_pseudo_bag(distill, per_tile):
    model, x = make("dtfd", distill=distill, instances_per_group=1), bag(9)
    out = forward(model, x, False)
    # 4 pseudo-bags x per_tile distilled instances carry all the tier-2 weight
    assert 1 <= int((out["attention"] > 0).sum()) <= 4 * per_tile
    np.testing.assert_allclose(float(out["attention"].sum()), 1.0, rtol=1e-5)
    members = np.asarray(model._pseudo_bags(9, train=False))
    chosen = np.flatnonzero(np.asarray(out["attention"]) > 0)
    assert len(set(members[:, chosen].argmax(0))) >= min(4, len(chosen) // per_tile)


def test_tiers_learn_only_from_their_own_loss():
    model, x = make("dtfd"), bag(7)

    def loss(m, key):
        logits = m(x, train=False)[key]
        logits = logits if logits.ndim == 2 else logits[None]
        labels = jnp.ones(logits.shape[0], jnp.int32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @nnx.jit
    def both_grads(m):
        return (nnx.grad(lambda m: loss(m, "logits"))(m),
                nnx.grad(lambda m: loss(m, "aux_logits"))(m))

    def total(g, part):
        return sum(float(jnp.abs(v).sum()) for v in jax.tree.leaves(getattr(g, part)))

    bag_g, aux_g = both_grads(model)
    for tier1 in ("reduce", "score1", "classifier1"):
        assert total(bag_g, tier1) == 0.0 and total(aux_g, tier1) > 0
    for tier2 in ("score2", "classifier2"):
        assert total(aux_g, tier2) == 0.0 and total(bag_g, tier2) > 0


def test_unknown_distillation_is_rejected():
    with pytest.raises(ValueError, match="MaxMinS"):
        build("dtfd", IN_DIM, N_CLASSES, rngs=nnx.Rngs(0), distill="max-min")
