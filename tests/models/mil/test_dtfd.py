"""DTFD-MIL: pseudo-bags, distillation, attention bookkeeping and the tier-wise gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tests.models.mil.helpers import IN_DIM, N_CLASSES, bag, forward, loss_grad, make
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


def _np(v):
    return np.asarray(v[...], np.float64)


def _np_linear(layer, x):
    return x @ _np(layer.kernel) + (_np(layer.bias) if layer.bias is not None else 0.0)


def _np_gated_scores(score, h):
    a = np.tanh(_np_linear(score.tanh_branch, h))
    g = 1 / (1 + np.exp(-_np_linear(score.gate_branch, h)))
    return _np_linear(score.weights, a * g)[:, 0]


def _np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _np_bag_logits(model, distilled):
    attention = _np_softmax(_np_gated_scores(model.score2, distilled))
    return _np_linear(model.classifier2, attention @ distilled)


def test_fewer_tiles_than_pseudo_bags_keep_the_empty_ones_as_the_official_split():
    """3 tiles, 4 pseudo-bags: the official np.array_split(range(3), 4) leaves one chunk empty;
    its feature is the sum over no tiles (0), so it predicts the tier-1 bias, and under AFS that
    zero feature is one of tier 2's 4 inputs. Written out in float64 numpy (float32 bound 1e-4)."""
    model, x = make("dtfd"), bag(3)
    h = np.maximum(np.asarray(x, np.float64) @ _np(model.reduce.kernel), 0)
    features = []
    for chunk in np.array_split(np.arange(3), 4):  # eval mode: the split of the tiles in order
        if len(chunk) == 0:
            features.append(np.zeros(h.shape[1]))
        else:
            features.append(_np_softmax(_np_gated_scores(model.score1, h[chunk])) @ h[chunk])
    features = np.stack(features)
    out = forward(model, x, False)
    assert out["aux_logits"].shape == (4, N_CLASSES)
    np.testing.assert_allclose(out["aux_logits"], _np_linear(model.classifier1, features),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["aux_logits"][3], _np(model.classifier1.bias), rtol=1e-6)
    np.testing.assert_allclose(out["logits"], _np_bag_logits(model, features), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(out["attention"].sum()), 1.0, rtol=1e-5)


def test_maxmin_distillation_takes_min_k_size_from_each_pseudo_bag():
    """5 tiles, 4 pseudo-bags of 2, 1, 1, 1 tiles, k=2: the official sort_idx[:2] and
    sort_idx[-2:] take every tile of each pseudo-bag, twice (max and min); tier 2 pools those 10."""
    model, x = make("dtfd", distill="MaxMinS", instances_per_group=2), bag(5)
    h = np.maximum(np.asarray(x, np.float64) @ _np(model.reduce.kernel), 0)
    distilled = np.concatenate([np.concatenate([h[c], h[c]])
                                for c in np.array_split(np.arange(5), 4)])
    assert distilled.shape[0] == 10
    out = forward(model, x, False)
    np.testing.assert_allclose(out["logits"], _np_bag_logits(model, distilled), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("distill", ["AFS", "MaxMinS"])
def test_empty_pseudo_bags_train_with_finite_gradients(distill):
    model, x = make("dtfd", distill=distill), bag(2)
    grads, out = loss_grad(model, x, 1)
    assert out["aux_logits"].shape == (4, N_CLASSES)
    # two of the four random chunks of 2 tiles are empty: they predict exactly the bias
    is_bias = np.isclose(np.asarray(out["aux_logits"]), np.asarray(model.classifier1.bias[...])).all(1)
    assert is_bias.sum() == 2
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
