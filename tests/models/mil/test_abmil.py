"""ABMIL and GMA against the attention formulas of Ilse et al. written out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.models.mil.helpers import bag, forward, make


def _linear(layer, x):
    return x @ layer.kernel[...] + layer.bias[...]


@pytest.mark.parametrize("name", ["abmil", "gated_abmil"])
def test_abmil_matches_ilse_formula(name):
    model, x = make(name), bag(7)
    h = jax.nn.relu(_linear(model.embed, x))
    a = jnp.tanh(_linear(model.score.tanh_branch, h))
    if name == "gated_abmil":
        a = a * jax.nn.sigmoid(_linear(model.score.gate_branch, h))
    attention = jax.nn.softmax(_linear(model.score.weights, a)[:, 0])
    out = forward(model, x, False)
    np.testing.assert_allclose(out["attention"], attention, rtol=1e-5)
    np.testing.assert_allclose(out["logits"], _linear(model.classifier, attention @ h), rtol=1e-5,
                               atol=1e-6)


def test_plain_abmil_has_no_gate_and_gma_has_one():
    assert make("abmil").score.gate_branch is None
    assert make("gated_abmil").score.gate_branch is not None
    assert make("gma").score.gate_branch is not None


def test_gma_pools_its_two_layer_embedding():
    model, x = make("gma"), bag(7)
    h = jax.nn.relu(_linear(model.fc2, jax.nn.relu(_linear(model.fc1, x))))
    out = forward(model, x, False)
    np.testing.assert_allclose(out["logits"], _linear(model.classifier, out["attention"] @ h),
                               rtol=1e-5, atol=1e-6)
