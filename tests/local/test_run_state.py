"""The whole-slide trainer's run state on --resume: lower learning rates and more epochs are recorded
recoveries; a setting that defines the run's steps is refused, named."""

import json

import optax
import pytest
from flax import nnx

from bigjax.local.run_state import TrainingState
from bigjax.local.wholeslide import WholeSlideConfig


def state(workdir):
    net = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    return TrainingState(workdir, net, nnx.Optimizer(net, optax.sgd(0.1), wrt=nnx.Param))


def saved_run(tmp_path):
    config = WholeSlideConfig(workdir=str(tmp_path), epochs=2, accum=2)
    s = state(tmp_path)
    meta = s.start(config, resume=False)
    meta.update(step=3, epoch=1, slide=1)
    s.log(kind="step", step=3, epoch=1)
    s.save(meta)
    s.checkpoints.close()
    return config


def test_lower_learning_rates_and_more_epochs_are_recorded(tmp_path):
    config = saved_run(tmp_path)
    s = state(tmp_path)
    meta = s.start(WholeSlideConfig(workdir=str(tmp_path), epochs=4, accum=2, lr_backbone=1e-6), resume=True)
    assert meta["step"] == 3
    changed = {"epochs": [2, 4], "lr_backbone": [config.lr_backbone, 1e-6]}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["resumes"] == [{"step": 3, "changed": changed}] and saved["epochs"] == 4
    assert s.rows()[-1] == {"kind": "resume", "step": 3, "epoch": 1, "changed": changed}


@pytest.mark.parametrize("change, named", [
    (dict(accum=4), r"accum: 4 \(was 2\)"),
    (dict(lr_heads=1e-3), r"lr_heads: 0.001 \(was 2e-05; a resume may only lower it\)"),
    (dict(modules=2, seed=1), r"modules: 2 \(was 4\); .*seed: 1 \(was 0\)"),
])
def test_what_defines_the_steps_is_refused(tmp_path, change, named):
    saved_run(tmp_path)
    with pytest.raises(ValueError, match=named + ".*a resume may change only a lower --lr_backbone"):
        state(tmp_path).start(WholeSlideConfig(**{"workdir": str(tmp_path), "epochs": 2, "accum": 2, **change}),
                              resume=True)
