"""The contract every aggregator keeps: shapes, attention, train/eval, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.models.mil.helpers import IN_DIM, N_CLASSES, SMALL, bag, forward, loss_grad, make, n_classes
from flax import nnx

from bigjax.models.mil import AGGREGATORS, bag_loss, build

PERMUTATION_INVARIANT = ("abmil", "gated_abmil", "abmil_bernoulli", "gma", "mean", "max")


@pytest.fixture(params=sorted(SMALL))
def name(request):
    return request.param


def test_registry_names():
    assert set(AGGREGATORS) == {"abmil", "gated_abmil", "abmil_bernoulli", "gated_abmil_bernoulli",
                                "dtfd", "transmil", "gma", "mean", "max"}


def test_build_unknown_name_says_what_exists():
    with pytest.raises(ValueError, match="unknown aggregator 'clam'.*abmil"):
        build("clam", IN_DIM, N_CLASSES, rngs=nnx.Rngs(0))


# bag size matters most to the token grid (TransMIL) and the pseudo-bags (DTFD)
SHAPE_CASES = [(name, n) for name in sorted(SMALL) for n in (1, 7)]
SHAPE_CASES += [("dtfd", 37), ("transmil", 37)]


@pytest.mark.parametrize("name, n", SHAPE_CASES)
def test_output_shapes_and_attention_sum(name, n):
    out = forward(make(name), bag(n), False)
    assert out["logits"].shape == (n_classes(name),)
    assert out["attention"].shape == (n,)
    assert np.all(np.asarray(out["attention"]) >= 0)
    np.testing.assert_allclose(float(out["attention"].sum()), 1.0, rtol=1e-5)
    assert np.all(np.isfinite(out["logits"]))
    if name == "dtfd":
        assert out["aux_logits"].shape == (4, N_CLASSES)  # empty pseudo-bags kept, as the official
    else:
        assert "aux_logits" not in out


@pytest.mark.parametrize("name", PERMUTATION_INVARIANT)
def test_permutation_invariance(name):
    model, x = make(name), bag(7)
    perm = np.random.default_rng(0).permutation(7)
    out, out_perm = forward(model, x, False), forward(model, x[perm], False)
    np.testing.assert_allclose(out_perm["logits"], out["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_perm["attention"], out["attention"][perm], rtol=1e-5, atol=1e-7)


def test_training_mode_gradients_and_dropout(name):
    # dropout 0.1 (TransMIL's default) on every aggregator: eval is deterministic, each train
    # call draws new masks, and the gradient through it is finite and reaches the parameters
    model, x = make(name, dropout=0.1), bag(7)
    eval_logits = [forward(model, x, False)["logits"] for _ in range(2)]
    (grads, out), (_, out_again) = loss_grad(model, x, 1), loss_grad(model, x, 1)
    np.testing.assert_array_equal(eval_logits[0], eval_logits[1])
    assert not np.allclose(out["logits"], eval_logits[0])
    assert not np.allclose(out["logits"], out_again["logits"])
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) >= len(leaves) - 1


def test_bag_loss_adds_mean_aux_cross_entropy():
    logits, aux = np.array([2.0, 0.0, -1.0]), np.array([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    ce = lambda z: np.log(np.exp(z).sum()) - z[0]  # noqa: E731  (label 0)
    np.testing.assert_allclose(float(bag_loss({"logits": logits}, 0)), ce(logits), rtol=1e-6)
    expected = ce(logits) + (ce(aux[0]) + ce(aux[1])) / 2
    np.testing.assert_allclose(float(bag_loss({"logits": logits, "aux_logits": aux}, 0)),
                               expected, rtol=1e-6)
