"""The official learning-rate schedule: x0.1 at given epochs (torch MultiStepLR), in optimiser updates."""

import numpy as np
import pytest

from bigjax.local.step import decay_updates, step_decay


def test_step_decay_multiplies_by_a_tenth_at_each_boundary_reached():
    schedule = step_decay(1.0, [2, 2, 5])  # two milestones on one update: x0.01 there
    np.testing.assert_allclose([float(schedule(u)) for u in (0, 1, 2, 4, 5, 9)],
                               [1, 1, 1e-2, 1e-2, 1e-3, 1e-3], rtol=1e-6)
    assert float(step_decay(0.5, [])(100)) == 0.5


@pytest.mark.parametrize("slides, accum, expected", [(8, 2, [4, 8]), (7, 2, [3, 7]), (3, 8, [0, 0])])
def test_an_epoch_decays_from_the_first_update_completed_on_its_slides(slides, accum, expected):
    # update u completes on slide (u+1)*accum - 1; epoch m starts at slide m*slides
    assert decay_updates([1, 2], slides, accum) == expected
    for m, u in zip([1, 2], expected):
        assert ((u + 1) * accum - 1) // slides >= m and (u == 0 or (u * accum - 1) // slides < m)
