"""--big_stages=auto: the fewest big stages whose predicted device peak fits, and the largest budget."""

import pytest
from flax import nnx

from bigjax.models.resnet import ResNet
from bigjax.models.resnet_fit import MIN_BUDGET, WHOLE_PARTITION, choose_big_stages

SHAPE = (1, 256, 256, 3)


@pytest.fixture(scope="module")
def model():
    return ResNet(18, rngs=nnx.Rngs(0))


def test_auto_picks_in_memory_when_the_whole_step_fits_and_big_stages_when_not(model):
    whole = choose_big_stages(model, SHAPE, 2**40)
    assert whole.big_stages is None and whole.budget is None  # all in memory
    assert "all in memory" in whole.reason
    limit = whole.predicted_bytes - 1
    fit = choose_big_stages(model, SHAPE, limit)
    assert fit.big_stages is not None and 0 <= fit.big_stages <= 4
    assert fit.predicted_bytes <= limit
    assert fit.budget >= min(MIN_BUDGET, WHOLE_PARTITION * 256 * 256 // 4 * 64 * 4)
    assert "all in memory would need" in fit.reason
    # the fewest: one stage fewer does not fit (or the stem alone is what was chosen)
    if fit.big_stages > 0:
        with pytest.raises(ValueError, match="does not fit"):
            choose_big_stages(model, SHAPE, limit, big_stages=fit.big_stages - 1)


def test_a_fixed_budget_is_kept_and_checked(model):
    fit = choose_big_stages(model, SHAPE, 2**40, big_stages=2, budget=3_000_000)
    assert (fit.big_stages, fit.budget) == (2, 3_000_000)
    with pytest.raises(ValueError, match=r"does not fit 1 MiB of device memory: big_stages=2 needs"):
        choose_big_stages(model, SHAPE, 2**20, big_stages=2, budget=3_000_000)
