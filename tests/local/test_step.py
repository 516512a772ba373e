"""The local step over a host budget: a module's input and output leave RAM for its backward."""

import jax
import numpy as np
from flax import nnx

from bigjax.layers import Execution
from bigjax.local import make_optimizers, train_step
from tests.local.helpers import LABEL, X, tiny_network, watch_holds


def _step(ex):
    net = tiny_network(2)
    losses = train_step(net, make_optimizers(net, lr_backbone=1e-3, lr_heads=1e-3), X, LABEL,
                        np.random.default_rng(0), execution=ex)
    return [float(v) for v in losses], jax.tree.leaves(nnx.state(net, nnx.Param))


def test_a_modules_input_and_output_are_not_in_ram_during_its_backward_when_they_spill(
        tmp_path, monkeypatch):
    """Over a budget that spills everything, the arrays the step holds between modules (the stem's
    output, each module's output) are dead whenever a backward kernel runs: they wait on disk
    (``Execution.hold``), not in RAM beside the budget. The step's losses and parameters are the
    in-RAM step's bit for bit."""
    held, alive, observer = watch_holds(monkeypatch)
    spilled = _step(Execution(200_000, observer=observer, host_memory=0, spill_dir=tmp_path))
    assert len(held) == 3 and alive and max(alive) == 0  # the stem's output and two modules'
    in_ram = _step(Execution(200_000))
    assert spilled[0] == in_ram[0]
    for a, b in zip(spilled[1], in_ram[1], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
