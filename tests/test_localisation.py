"""metrics.localisation: AUC 1 for a score equal to the mask, about 0.5 for random scores."""
import numpy as np
import pytest

from bigjax.metrics import localisation


def _slides(n_slides=12, n_tiles=200, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, n_tiles) ** 2 for _ in range(n_slides)]  # tumour shares


def test_score_equal_to_the_mask_localises_perfectly():
    masks = _slides()
    result = localisation(masks, masks)
    assert result.mean == 1.0 and result.ci == (1.0, 1.0) and result.n_slides == 12


def test_random_scores_give_half_within_their_interval():
    masks = _slides(n_slides=40)
    rng = np.random.default_rng(1)
    result = localisation([rng.normal(size=m.shape) for m in masks], masks)
    assert abs(result.mean - 0.5) < 0.05 and result.ci[0] < 0.5 < result.ci[1]
    assert result.ci[1] - result.ci[0] < 0.1


def test_benign_slides_are_left_out_and_reversed_scores_give_zero():
    masks = _slides(n_slides=3) + [np.zeros(50)]
    result = localisation([-m for m in masks], masks)
    assert result.n_slides == 3 and result.mean == 0.0 and np.isnan(result.per_slide[-1])
    assert np.isnan(localisation([np.ones(4)], [np.zeros(4)]).mean)


def test_threshold_is_half_the_tile_and_shapes_are_checked():
    mask = np.array([0.0, 0.49, 0.5, 1.0])
    assert localisation([np.array([0.0, 0.9, 0.1, 0.2])], [mask]).mean == 0.5  # 1.0 were 0.49 tumour
    with pytest.raises(ValueError, match="slide 0 has scores of shape"):
        localisation([np.zeros(3)], [np.zeros(4)])
