"""The official one-class ABMIL: sigmoid output, clamped negative log Bernoulli likelihood.

AttentionDeepMIL's model.py: `Y_prob = classifier(M)` (Linear(L, 1) + Sigmoid),
`Y_prob = clamp(Y_prob, 1e-5, 1 - 1e-5)`, `-(Y log Y_prob + (1 - Y) log(1 - Y_prob))`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tests.models.mil.helpers import IN_DIM, bag, forward, make

from bigjax.models.mil import bag_loss, build
from bigjax.train.config import TrainConfig
from bigjax.train.steps import HEAD_ONLY, MILClassifier, jitted_step


def np_bernoulli_nll(prob: float, y: int) -> float:
    """The official objective; its clamp bounds rounded to float32, as torch.clamp on a float32
    Y_prob rounds them (1 - 1e-5 is 0.99998999 there: log(1 - p) differs by 1e-4 from float64's)."""
    p = float(np.clip(np.float32(prob), np.float32(1e-5), np.float32(1 - 1e-5)))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def lin(layer, v):
    return v @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...], np.float64)


def _np_prob(model, x):
    """Y_prob of the official forward, in float64 numpy."""
    h = np.maximum(lin(model.embed, np.asarray(x, np.float64)), 0)
    raw = lin(model.score.weights, np.tanh(lin(model.score.tanh_branch, h)))[:, 0]
    a = np.exp(raw - raw.max()) / np.exp(raw - raw.max()).sum()
    return 1 / (1 + np.exp(-lin(model.classifier, a @ h)[0]))


@pytest.mark.parametrize("y", [0, 1])
def test_loss_is_the_official_bernoulli_likelihood(y):
    model, x = make("abmil_bernoulli"), bag(7)
    assert model.classifier.kernel.shape == (24, 1)  # one output, as Linear(L*K, 1)
    out = forward(model, x, False)
    prob = _np_prob(model, x)
    np.testing.assert_allclose(float(out["bernoulli_prob"]), prob, rtol=1e-5)
    # the two-class view every consumer reads: softmax(0, z) = (1 - Y_prob, Y_prob)
    np.testing.assert_allclose(jax.nn.softmax(out["logits"]), [1 - prob, prob], rtol=1e-5)
    np.testing.assert_allclose(float(bag_loss(out, y)), np_bernoulli_nll(prob, y), rtol=1e-5)


@pytest.mark.parametrize("prob, y", [(0.0, 1), (1.0, 0), (1e-7, 1), (1 - 1e-8, 0), (0.3, 1)])
def test_loss_clamps_as_the_official(prob, y):
    out = {"logits": jnp.zeros(2), "bernoulli_prob": jnp.float32(prob)}
    np.testing.assert_allclose(float(bag_loss(out, y)), np_bernoulli_nll(prob, y), rtol=1e-6)


def test_the_one_class_heads_need_a_binary_task():
    with pytest.raises(ValueError, match="binary head: 3 classes"):
        build("gated_abmil_bernoulli", IN_DIM, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="--aggregator=abmil_bernoulli: .* not --task=panda"):
        TrainConfig("w", "s", task="panda", aggregator="abmil_bernoulli")
    assert TrainConfig("w", "s", task="camelyon", aggregator="abmil_bernoulli").n_classes == 2


def test_training_step_descends_the_bernoulli_loss():
    """The step the CLIs' feature modes take (steps.jitted_step on features): its loss is the
    batch mean of the numpy likelihood, and an SGD step lowers it."""
    head = make("gated_abmil_bernoulli")
    model = MILClassifier(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), head)  # encoder unused on features
    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=HEAD_ONLY)
    feats, labels = jnp.stack([bag(5, 1), bag(5, 2)]), jnp.array([1, 0])

    def np_loss():
        probs = [float(forward(head, feats[i], False)["bernoulli_prob"]) for i in range(2)]
        return np.mean([np_bernoulli_nll(p, int(y)) for p, y in zip(probs, labels)])

    before = np_loss()
    loss = jitted_step(model, optimizer, feats, labels, encode=False)
    np.testing.assert_allclose(float(loss), before, rtol=1e-5)
    assert np_loss() < before
