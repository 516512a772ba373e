"""``--encoder=mesh`` against ``--encoder=inmemory``: the same first step (loss, updated parameters)."""

import numpy as np
import pytest
from flax import nnx

modes = pytest.importorskip("bigjax.train.modes")  # the lead's mode registry (on main, 2026-12-01)

from bigjax.data.bags import Bag  # noqa: E402
from bigjax.train.loop import Run  # noqa: E402
from tests.train.conftest import store  # noqa: E402,F401  (the generated tile store fixture)
from tests.train.test_loop import tiny  # noqa: E402


@pytest.mark.slow
def test_a_mesh_step_is_the_in_memory_step(store, tmp_path):  # noqa: F811
    assert "mesh" in modes.names()
    runs = {name: Run(tiny(store, tmp_path / name, encoder=name, accum=1))
            for name in ("mesh", "inmemory")}
    tiles = np.random.default_rng(0).integers(0, 255, size=(2, 5, 16, 16, 3), dtype=np.uint8)
    batch = [Bag(tiles=tiles[i], label=i, slide_id=f"s{i}", indices=np.arange(5)) for i in range(2)]
    losses = {name: run.step(batch) for name, run in runs.items()}
    np.testing.assert_allclose(losses["mesh"], losses["inmemory"], rtol=1e-5)
    after = {name: dict(nnx.to_flat_state(nnx.state(run.model, nnx.Param)))
             for name, run in runs.items()}
    # Adam moves a parameter by about lr (1e-3) whatever its gradient's size, so a gradient that is
    # round-off in both runs (zero in exact arithmetic) may move it the other way: every parameter
    # agrees to 2 lr, and all but a handful exactly (to float32 round-off)
    far = total = 0
    for path, v in after["inmemory"].items():
        diff = np.abs(np.asarray(after["mesh"][path].get_value()) - np.asarray(v.get_value()))
        assert diff.max() < 2.1e-3, path
        far, total = far + int(np.sum(diff > 1e-5)), total + diff.size
    assert far <= 1e-5 * total, (far, total)


@pytest.mark.slow
def test_a_mesh_run_trains_checkpoints_and_evaluates(store, tmp_path):  # noqa: F811
    from bigjax.train.loop import train

    results = train(tiny(store, tmp_path, encoder="mesh", epochs=1))
    assert "test QWK" in "\n".join(results["lines"])
