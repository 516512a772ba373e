"""Encoder modes as objects: a mode defined outside the package trains through the unchanged loop."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.train import modes
from bigjax.train.loop import Run, train
from tests.train.test_loop import tiny


class MeanColour(nnx.Module):
    """A toy tile encoder: each tile's mean colour through one linear layer."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 8, rngs=rngs)
        self.embed_dim = 8

    def __call__(self, x, *, train: bool):
        return self.linear(jnp.mean(x, axis=(1, 2)))


def _toy_forward(encoder, x):
    return encoder(x, train=False)


@modes.register("toy")
class Toy(modes.EncoderMode):
    """Trains the toy encoder end to end with the inherited jitted step."""

    eval_forward = staticmethod(_toy_forward)

    def build_encoder(self, rngs):
        return MeanColour(rngs)


def test_a_mode_defined_in_a_test_trains_through_the_loop(store, tmp_path):
    config = tiny(store, tmp_path, encoder="toy", epochs=1)
    before = nnx.clone(Run(config).model.encoder.linear.kernel[...])
    results = train(config)
    after = Run(config)
    after.checkpoints.restore_latest(after.model, after.optimizer)
    assert not np.allclose(after.model.encoder.linear.kernel[...], before)  # the encoder trained
    assert "test QWK" in "\n".join(results["lines"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3, 4]


def test_unknown_mode_names_the_choices(store, tmp_path):
    with pytest.raises(ValueError, match="choose one of big, inmemory, frozen, precomputed"):
        Run(tiny(store, tmp_path, encoder="huge"))


def test_modes_say_what_they_train_and_read():
    assert modes.names()[:4] == ("big", "inmemory", "frozen", "precomputed")
    big, frozen = (modes.get_class(n) for n in ("big", "frozen"))
    assert big.trains_encoder and not frozen.trains_encoder
    assert set(big.settings) == set(modes.STREAMING_SETTINGS) and not frozen.settings


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frozen", "big"])
def test_a_vit_encoder_runs_through_the_modes(store, tmp_path, mode):
    """--arch picks a ViT by timm name; its model-card normalisation and eval forward come with it."""
    config = tiny(store, tmp_path, encoder=mode, arch="vit_small_patch16_224", epochs=1,
                  max_partition_bytes=2**30)
    results = train(config)
    assert "test QWK" in "\n".join(results["lines"])
    assert modes.get(config, tmp_path).mean == (0.5, 0.5, 0.5)  # timm's augreg ViTs: inception


def test_big_auto_trains_in_memory_when_the_whole_step_fits(store, tmp_path, caplog):
    config = tiny(store, tmp_path, encoder="big", big_stages="auto", max_partition_bytes="auto",
                  device_memory=2**40, epochs=1)
    with caplog.at_level("INFO", logger="bigjax.train.modes"):
        mode = modes.get(config, tmp_path)
    assert not mode.streams and mode.execution is None
    assert "auto fit for resnet18 steps of 8x16x16x3 tiles: all in memory" in caplog.text
    assert "test QWK" in "\n".join(train(config)["lines"])


def test_big_auto_on_a_cpu_asks_for_the_device_memory(store, tmp_path):
    with pytest.raises(ValueError, match="reports no memory limit; give --device_memory"):
        modes.get(tiny(store, tmp_path, encoder="big", big_stages="auto"), tmp_path)


def test_compute_dtype_gives_a_mixed_precision_vit_and_is_refused_for_a_resnet(tmp_path):
    from bigjax.train.config import TrainConfig
    config = TrainConfig(workdir=str(tmp_path), store=str(tmp_path), encoder="inmemory",
                         arch="vit_small_patch16", compute_dtype="bfloat16")
    encoder = nnx.eval_shape(lambda: modes.get(config, tmp_path).build_encoder(nnx.Rngs(0)))
    assert encoder.config.dtype == "bfloat16"
    assert encoder.blocks[0].attn.qkv.kernel.dtype == jnp.float32  # parameters stay float32
    with pytest.raises(ValueError, match="--compute_dtype=bfloat16: only ViT encoders .* --arch=resnet18"):
        TrainConfig(workdir=str(tmp_path), store=str(tmp_path), compute_dtype="bfloat16")


@pytest.mark.slow  # two short Big-Layers runs: ~2.5 CPU-minutes
def test_big_mode_on_the_compiled_engine_takes_the_eager_engines_steps(store, tmp_path):
    """``--big_engine=compiled`` reaches the execution, and a short run's losses are the eager's."""
    losses = {}
    for engine in ("eager", "compiled"):
        config = tiny(store, tmp_path / engine, encoder="big", big_engine=engine, epochs=1)
        assert Run(config).mode.execution.engine == engine
        train(config)
        rows = [json.loads(line) for line in open(tmp_path / engine / "metrics.jsonl")]
        losses[engine] = [r["loss"] for r in rows if r["kind"] == "step"]
    assert len(losses["eager"]) == 4
    np.testing.assert_allclose(losses["compiled"], losses["eager"], rtol=1e-5)
