"""Local learning on tile bags streamed through Big-Layers (``bags.local_step`` with an Execution)."""

import jax
import numpy as np
import pytest

from bigjax.layers import Execution
from bigjax.local import bags
from bigjax.train.loop import Run
from tests.local.helpers import watch_holds
from tests.local.test_mode import _bags, _local

_update = bags._update


def _step(store, workdir, tiles, labels, ex=None):
    """The step's losses and the gradients it hands to the optimiser."""
    run = Run(_local(store, workdir, accum=1, lr=3e-3))
    grads = []

    def update(model, optimizer, g):
        grads.append(g)
        return _update(model, optimizer, g)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bags, "_update", update)
        losses = bags.local_step(run.model, run.optimizer, tiles, labels,
                                 np.random.default_rng(0), execution=ex)
    return [float(v) for v in losses], [np.asarray(g) for g in jax.tree.leaves(grads[0])]


def test_a_streamed_local_step_equals_the_jitted_one_and_spilled_equals_in_ram(store, tmp_path,
                                                                             monkeypatch):
    """The same batch through the jitted in-memory step, the Big-Layers step in RAM and the one
    whose every activation spills: the same losses and parameter gradients
    (streamed = jitted to round-off; spilled = in RAM bit for bit). Spilled, the stem's output and
    each module's output are dead whenever a backward kernel runs (held on disk)."""
    run = Run(_local(store, tmp_path / "bags", accum=1, lr=3e-3))
    batch = _bags(run)
    tiles, _ = run.mode.inputs(run.model, batch)
    labels = np.array([b.label for b in batch], np.int32)
    jitted = _step(store, tmp_path / "jit", tiles, labels)
    in_ram = _step(store, tmp_path / "ram", tiles, labels, Execution(64 * 2**20))

    held, alive, observer = watch_holds(monkeypatch)
    spilled = _step(store, tmp_path / "spill", tiles, labels,
                    Execution(64 * 2**20, observer=observer, host_memory=0, spill_dir=tmp_path / "d"))
    assert len(held) == 1 + 4 and alive and max(alive) == 0, (len(held), alive)
    np.testing.assert_allclose(in_ram[0], jitted[0], rtol=1e-4)
    assert len(in_ram[1]) == len(jitted[1]) > 0
    scale = max(np.abs(b).max() for b in jitted[1])  # some are zero but for round-off (a bias
    for a, b in zip(in_ram[1], jitted[1]):             # before a BatchNorm)
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale)
    assert spilled[0] == in_ram[0]
    assert all(np.array_equal(a, b) for a, b in zip(spilled[1], in_ram[1]))
