"""``--encoder=local`` through the training loop: every module trains, eval embeddings come back."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from bigjax.local.bags import local_step, module_params
from bigjax.train import modes
from bigjax.train.loop import Run, train
from tests.train.test_loop import tiny


def _local(store, workdir, **overrides):
    return tiny(store, workdir, encoder="local", modules=4, **overrides)


def _params(run, i):
    return nnx.state(run.model, module_params(run.model.encoder, i))


@pytest.mark.slow  # ~1.5 min of CPU: four module compiles, the eval forward, the final evaluation
def test_the_local_mode_trains_every_module_through_the_loop(store, tmp_path):
    config = _local(store, tmp_path, epochs=1)
    fresh = Run(config)
    before = [nnx.clone(_params(fresh, i)) for i in range(4)]
    stem = np.asarray(fresh.model.encoder.conv1.kernel[...])
    results = train(config)
    after = Run(config)
    after.checkpoints.restore_latest(after.model, after.optimizer)
    for i in range(4):
        moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(_params(after, i)),
                                                       jax.tree.leaves(before[i]))]
        assert all(moved), f"module {i + 1}: a parameter did not train"
    assert np.array_equal(after.model.encoder.conv1.kernel[...], stem), "the stem is frozen"
    assert "test QWK" in "\n".join(results["lines"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3, 4]


def test_each_module_learns_its_own_loss(store, tmp_path):
    """Repeating one batch lowers every module's loss; the mode's step returns L_K."""
    run = Run(_local(store, tmp_path, accum=1, lr=3e-3))
    mode, bags = run.mode, [b for b in _bags(run)]
    tiles, _ = mode.inputs(run.model, bags)
    labels = np.array([b.label for b in bags], np.int32)
    first = [float(v) for v in local_step(run.model, run.optimizer, tiles, labels,
                                          np.random.default_rng(0))]
    for _ in range(6):
        last = [float(v) for v in local_step(run.model, run.optimizer, tiles, labels,
                                             np.random.default_rng(0))]
    assert all(b < a for a, b in zip(first, last)), (first, last)


def _bags(run):
    from bigjax.data.bags import train_bags
    return list(train_bags(run.store, run.slides["train"][:2], k=4, seed=0, epoch=0))


def test_local_flags_are_refused_for_other_modes_and_checked():
    from experiments.flags import _check_mode_settings
    with pytest.raises(ValueError, match="--modules has no effect with --encoder=big"):
        _check_mode_settings("big", {"modules": 4})
    _check_mode_settings("local", {"modules": 4, "local_alpha": 0.5})
    with pytest.raises(ValueError, match="--max_partition_bytes has no effect with --encoder=local"):
        _check_mode_settings("local", {"max_partition_bytes": 10**6})
    assert "local" in modes.names()


def test_bad_local_settings_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="--modules=3: must divide the 8 pieces"):
        tiny("s", tmp_path, modules=3)
    with pytest.raises(ValueError, match="--local_alpha=-1"):
        tiny("s", tmp_path, local_alpha=-1.0)
    with pytest.raises(ValueError, match="--local_norm=layer: choose batch or group"):
        tiny("s", tmp_path, local_norm="layer")


@pytest.mark.slow  # ~35 s on the loaded machine: a ResNet-18's eager initialisation
def test_local_norm_group_gives_group_norm_in_the_resnet_and_batch_norm_in_the_decoders():
    from bigjax.layers.modules import BigBatchNorm
    from bigjax.local.bags import LocalResNet
    from bigjax.local.group_norm import BigGroupNorm
    enc = LocalResNet(18, 2, 3, norm="group", rngs=nnx.Rngs(0))
    assert isinstance(enc.bn1, BigGroupNorm) and isinstance(enc.layer4[1].bn2, BigGroupNorm)
    assert isinstance(enc.aux[0].decoder.norm, BigBatchNorm)
    _check = __import__("experiments.flags", fromlist=["_check_mode_settings"])._check_mode_settings
    _check("local", {"local_norm": "group"})
    with pytest.raises(ValueError, match="--local_norm has no effect with --encoder=big"):
        _check("big", {"local_norm": "group"})
