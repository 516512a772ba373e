"""Mean and max pooling over per-tile logits."""

import numpy as np
from tests.models.mil.helpers import bag, forward, make


def _tile_logits(model, x):
    return np.asarray(model.head(x, False))


def test_mean_pool_is_mean_of_tile_logits():
    model, x = make("mean"), bag(7)
    out = forward(model, x, False)
    np.testing.assert_allclose(out["logits"], _tile_logits(model, x).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["attention"], np.full(7, 1 / 7), rtol=1e-6)


def test_max_pool_attention_marks_the_winning_tiles():
    model, x = make("max"), bag(7)
    tile_logits = _tile_logits(model, x)
    out = forward(model, x, False)
    np.testing.assert_allclose(out["logits"], tile_logits.max(0), rtol=1e-6)
    expected = np.bincount(tile_logits.argmax(0), minlength=7) / tile_logits.shape[1]
    np.testing.assert_allclose(out["attention"], expected, rtol=1e-6)
