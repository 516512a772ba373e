"""Every MIL head initialises as its official PyTorch code: each layer's weights and biases are
tested against that distribution (Kolmogorov-Smirnov, and the uniform's bounds), at paper sizes.

The expected distributions are written here from the torch sources, not from bigjax.models.mil.init:
nn.Linear / nn.Conv reset_parameters give weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
fan_in = in_features (conv: in_channels / groups x kernel size); CLAM's initialize_weights (the GMA
code) gives xavier_normal_ weights N(0, 2 / (fan_in + fan_out)) and zero biases; LayerNorm is ones
and zeros; TransMIL's class token torch.randn.
"""

import math

import numpy as np
import pytest
from flax import nnx
from scipy import stats

from bigjax.models.mil import AGGREGATORS, build

IN_DIM = 64
TORCH_DEFAULT = sorted(set(AGGREGATORS) - {"gma"})


def _params(model) -> dict:
    return {path: np.asarray(v.get_value(), np.float64).ravel()
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def expected(path: tuple, shapes: dict, family: str):
    """The official distribution of the parameter at path: a scipy distribution, or a constant."""
    name, layer = path[-1], path[:-1]
    if name == "cls_token":
        return stats.norm(0, 1)
    if layer + ("scale",) in shapes:  # LayerNorm
        return 1.0 if name == "scale" else 0.0
    kernel = shapes[layer + ("kernel",)]
    fan_in, fan_out = math.prod(kernel[:-1]), kernel[-1]
    if family == "xavier":
        return stats.norm(0, math.sqrt(2 / (fan_in + fan_out))) if name == "kernel" else 0.0
    bound = 1 / math.sqrt(fan_in)
    return stats.uniform(-bound, 2 * bound)


def check_init(model, family: str) -> None:
    """Assert every parameter of model follows its official distribution."""
    values = _params(model)
    shapes = {path: tuple(v.get_value().shape)
              for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path, x in values.items():
        dist = expected(path, shapes, family)
        if isinstance(dist, float):
            np.testing.assert_array_equal(x, dist, err_msg=str(path))
            continue
        assert stats.kstest(x, dist.cdf).pvalue > 1e-3, (path, x.std(), dist.std())
        if family == "torch" and path[-1] != "cls_token":
            low, high = dist.support()
            assert low <= x.min() and x.max() <= high, (path, x.min(), x.max(), high)
            if x.size >= 500:  # a uniform fills its range: max |x| within 1% of the bound
                assert np.abs(x).max() > 0.99 * high, (path, np.abs(x).max(), high)


@pytest.mark.parametrize("name", TORCH_DEFAULT)
def test_heads_initialise_as_torch_defaults(name):
    n_classes = 2 if name.endswith("_bernoulli") else 3
    check_init(build(name, IN_DIM, n_classes, rngs=nnx.Rngs(0)), "torch")


def test_gma_initialises_as_clam_initialize_weights():
    check_init(build("gma", IN_DIM, 3, rngs=nnx.Rngs(0)), "xavier")


@pytest.mark.parametrize("layer, family", [
    (lambda: nnx.Linear(IN_DIM, 500, rngs=nnx.Rngs(0)), "torch"),  # flax default: lecun, zero bias
    (lambda: nnx.Linear(IN_DIM, 500, kernel_init=nnx.initializers.xavier_normal(),
                        rngs=nnx.Rngs(0)), "xavier"),  # flax's truncated xavier
])
def test_the_check_rejects_other_initialisations(layer, family):
    class Head(nnx.Module):
        def __init__(self):
            self.fc = layer()

    with pytest.raises(AssertionError):
        check_init(Head(), family)
