"""Settings are refused before any work, each error naming the setting and its value."""

import dataclasses
import json

import pytest

from bigjax.train.config import TrainConfig
from bigjax.train.optim import OptimizerConfig


def _config(**fields):
    return TrainConfig(workdir="w", store="s", **fields)


@pytest.mark.parametrize("fields,message", [
    (dict(aggregator="bogus"), r"--aggregator=bogus: choose one of abmil"),
    (dict(seed=-1), r"--seed=-1: must be an integer >= 0"),
    (dict(big_stages=5), r"--big_stages=5: must be in 0..4 or auto"),
    (dict(big_stages="all"), r"--big_stages=all: must be in 0..4 or auto"),
    (dict(max_partition_bytes="auto", arch="vit_small_patch16_224"), r"ResNets only, not --arch=vit"),
    (dict(device_memory=0), r"--device_memory=0: must be an integer >= 1"),
    (dict(batch_size=0), r"--batch_size=0: must be an integer >= 1"),
    (dict(arch="resnet20"), r"--arch=resnet20: choose one of resnet18, resnet34, resnet50, vit_"),
    (dict(host_dtype="float16"), r"--host_dtype=float16: choose one of float32, bfloat16"),
    (dict(host_dtype="bfloat16", arch="vit_small_patch16_224"), r"for the Big ResNets, not --arch=vit"),
    (dict(big_engine="fast"), r"--big_engine=fast: choose one of eager, compiled"),
    (dict(big_engine="compiled", arch="vit_small_patch16_224"), r"ResNets' convolutions, not --arch=vit"),
    (dict(big_engine="compiled", host_memory="8GiB"), r"--big_engine=compiled with --host_memory: a "),
])
def test_bad_run_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        _config(**fields)


@pytest.mark.parametrize("fields,message", [
    (dict(lr=0.0), r"--lr=0.0: the learning rate must be positive"),
    (dict(lr=-1.0), r"--lr=-1.0"),
    (dict(accum=0), r"--accum=0"),
    (dict(name="sgd"), r"--optimizer=sgd: choose one of adam"),
])
def test_bad_optimiser_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**fields)


def test_json_round_trips_with_the_history_of_resumes():
    a = _config()
    b = dataclasses.replace(a, batch_size=8, optim=dataclasses.replace(a.optim, lr=3e-4))
    assert TrainConfig.from_json(b.to_json()) == b
    resumes = [{"step": 4, "changed": {"optim.lr": [1e-4, 3e-5]}}]
    assert json.loads(b.to_json(resumes=resumes))["resumes"] == resumes
    assert TrainConfig.from_json(b.to_json(resumes=resumes)) == b
