"""Per-tile scores of every aggregator, each checked against an independent computation."""

import numpy as np
import pytest
from tests.models.mil.helpers import N_CLASSES, SMALL, bag, make

from bigjax.models.mil import AGGREGATORS
from bigjax.models.mil.scores import as_columns, default_score, informative_scores, score_names, tile_scores


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_every_head_scores_every_tile(name):
    model, x = make(name), bag(9)
    scores = tile_scores(model, x)
    out = model(x, train=False)
    np.testing.assert_allclose(scores["logits"], out["logits"], rtol=1e-6)
    np.testing.assert_allclose(scores["attention"], out["attention"], rtol=1e-6)
    for s in score_names(model):
        assert scores[s].shape == (9,) and np.all(np.isfinite(scores[s]))
    assert default_score(model) == score_names(model)[0]


def test_instance_score_is_one_minus_class0_of_the_tile_logits():
    for name in ("mean", "max"):
        model, x = make(name), np.asarray(bag(6), np.float64)
        h = np.maximum(x @ np.asarray(model.head.fc1.kernel[...]) + np.asarray(model.head.fc1.bias[...]), 0)
        logits = h @ np.asarray(model.head.fc2.kernel[...]) + np.asarray(model.head.fc2.bias[...])
        scores = tile_scores(model, bag(6))
        np.testing.assert_allclose(scores["instance_logits"], logits, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(scores["instance"], 1 - _softmax(logits)[:, 0], rtol=1e-4, atol=1e-6)


def test_dtfd_cam_is_the_official_get_cam_1d():
    """einsum('bgf,cf->bcg', tattFeats, classifier.fc.weight) with tattFeats = tier-1 attention x
    reduced feature, pseudo-bags round-robin (eval mode), written out here in numpy."""
    model, x = make("dtfd"), np.asarray(bag(11), np.float64)
    h = np.maximum(x @ np.asarray(model.reduce.kernel[...]), 0)
    s = model.score1
    a = np.tanh(h @ np.asarray(s.tanh_branch.kernel[...]) + np.asarray(s.tanh_branch.bias[...]))
    g = 1 / (1 + np.exp(-(h @ np.asarray(s.gate_branch.kernel[...]) + np.asarray(s.gate_branch.bias[...]))))
    raw = ((a * g) @ np.asarray(s.weights.kernel[...]) + np.asarray(s.weights.bias[...]))[:, 0]
    attention = np.zeros(11)
    for group in range(4):
        members = np.arange(11) % 4 == group
        attention[members] = _softmax(raw[members])
    weight = np.asarray(model.classifier1.kernel[...]).T  # torch's (C, F) fc.weight
    cam = np.einsum("gf,cf->gc", attention[:, None] * h, weight)
    scores = tile_scores(model, bag(11))
    np.testing.assert_allclose(scores["cam_logits"], cam, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scores["cam"], 1 - _softmax(cam)[:, 0], rtol=1e-4, atol=1e-6)


def test_mean_pooling_attention_is_not_informative_and_columns_flatten():
    model = make("mean")
    assert "attention" not in informative_scores(model) and "instance" in informative_scores(model)
    columns = as_columns(tile_scores(model, bag(5)))
    assert set(columns) == {"attention", "instance", *(f"instance_logits_{c}" for c in range(N_CLASSES))}
    assert set(SMALL) == set(AGGREGATORS)
