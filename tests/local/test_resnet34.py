"""The paper's network on a tiny slide (1x96x96, K = 4): the Big path's module gradients equal the
in-memory ones, with per-module budgets small enough to cut the early modules into row bands."""

import numpy as np
import pytest
from flax import nnx

from bigjax.layers import Execution
from bigjax.local import local_resnet34, module_grad, paths_for
from tests.local.helpers import randomize_batch_norm, rel_err

pytestmark = pytest.mark.slow

X = np.random.default_rng(3).normal(size=(1, 96, 96, 3)).astype(np.float32)
# x_0 is 16x16x64; modules 1-3 stream in bands, module 4 (3x3x512x512 kernels) needs ~20 MB
BUDGETS = (400_000, 1_600_000, 6_000_000, 40_000_000)


def _grads(net, execution):
    paths = paths_for(execution, 4)
    plan = net.sample(np.random.default_rng(0), X.shape)
    h, out = net.stem(paths[0], X), []
    for m, path, (positions, patch) in zip(net.local_modules, paths, plan):
        loss, h, grads = module_grad(m, path, h, 1, positions, patch=patch)
        out.append((loss, grads))
    return out


def test_big_path_module_gradients_equal_in_memory():
    net = local_resnet34(4, 2, aux_kernel=2, final_kernel=1, rngs=nnx.Rngs(0))  # H: >1 position
    randomize_batch_norm(net, 0)
    events = []

    def count(event, fn, *args, **kwargs):
        events.append(event)
        return fn(*args, **kwargs)

    executions = [Execution(b, observer=count) for b in BUDGETS]
    big = _grads(nnx.clone(net), executions)
    memory = _grads(nnx.clone(net), None)
    assert events.count("take_band") > 50
    for i, ((loss_b, g_b), (loss_m, g_m)) in enumerate(zip(big, memory)):
        assert rel_err(loss_b, loss_m) < 1e-5, f"module {i + 1}"
        assert rel_err(g_b, g_m) < 1e-4, f"module {i + 1}"
