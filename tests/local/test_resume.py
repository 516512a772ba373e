"""Whole-slide checkpoints: a run stopped, killed and resumed takes the steps of an uninterrupted one."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from bigjax.data import layouts, tissue_boxes
from bigjax.data.synthetic import make_panda_like
from bigjax.errors import Interrupted
from bigjax.local.wholeslide import WholeSlideConfig, train_wholeslide
from tests.local.helpers import tiny_network


# slow: ~4.5 min on the loaded 2-core machine, nearly all of it the one-time compiles of the tiny
# network's eager initialisation (~85 s) and of its jitted steps
pytestmark = pytest.mark.slow

SPLITS = ["train"] * 4 + ["val", "test"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    data = make_panda_like(tmp_path_factory.mktemp("resume") / "data", n_slides=6, seed=0,
                           side=(256, 320), workers=1)
    return [dataclasses.replace(s, split=split) for s, split in zip(layouts.panda_layout(data), SPLITS)]


def _config(workdir) -> WholeSlideConfig:
    # accumulation 2, a checkpoint every 3 slides and the lr decay after epoch 1: resumes land
    # inside an accumulation and on both sides of the decay
    return WholeSlideConfig(workdir=str(workdir), n_classes=6, epochs=2, accum=2, lr_backbone=1e-3,
                            lr_heads=1e-3, decay_epochs=(1,), checkpoint_every=3, pad=128,
                            in_memory=True, n_patches=2, n_boot=20)


def _run(workdir, slides, seed=0, **kwargs):
    net = tiny_network(2, seed=seed)
    return net, train_wholeslide(_config(workdir), slides, progress=False, network=net, **kwargs)


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["losses"]) for r in rows if r["kind"] == "step"], [
        (r["epoch"], r["losses"]) for r in rows if r["kind"] == "epoch"]


def _kill_at(step):
    def on_step(n):
        if n == step:
            raise RuntimeError(f"killed after slide {n}")
    return on_step


def test_a_stopped_and_killed_run_resumes_to_the_uninterrupted_one(slides, tmp_path, monkeypatch):
    whole, expected = _run(tmp_path / "whole", slides)
    parts = tmp_path / "parts"
    with pytest.raises(Interrupted, match="after slide 1"):  # inside the first accumulation
        _run(parts, slides, should_stop=lambda: True)
    with pytest.raises(FileExistsError, match="--resume"):
        _run(parts, slides)
    with pytest.raises(RuntimeError, match="killed after slide 7"):  # slide 6's checkpoint is kept
        _run(parts, slides, seed=7, resume=True, on_step=_kill_at(7))
    located = []
    monkeypatch.setattr(tissue_boxes, "locate", lambda *a: located.append(a))
    resumed, results = _run(parts, slides, seed=7, resume=True)  # other initial weights: restored
    assert located == []  # the tissue boxes the first part found, not the slides decoded again

    assert _losses(parts) == _losses(tmp_path / "whole")  # row 7 of the killed part dropped
    steps, epochs = _losses(parts)
    assert [s for s, _ in steps] == list(range(1, 9)) and [e for e, _ in epochs] == [1, 2]
    for a, b in zip(jax.tree.leaves(nnx.state(resumed)), jax.tree.leaves(nnx.state(whole)), strict=True):
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(a) if _is_key(a) else a),
                                      np.asarray(jax.random.key_data(b) if _is_key(b) else b))
    assert results["test"] == expected["test"] and results["val"] == expected["val"]
    assert results["best_epoch"] == expected["best_epoch"] and results["test"]["n"] == 1
    assert set(results["test"]) >= {"qwk", "qwk_ci95", "accuracy", "accuracy_ci95", "probs"}
    heads = results["test"]["heads_qwk"]  # A_1, then H: each with its interval over slides
    assert len(heads) == 2 and all(set(h) == {"qwk", "qwk_ci95"} for h in heads)
    assert heads[-1]["qwk"] == results["test"]["qwk"]

    other = dataclasses.replace(_config(parts), accum=4)
    with pytest.raises(ValueError, match=r"other settings \(accum: 4 \(was 2\)\)"):
        train_wholeslide(other, slides, resume=True, network=tiny_network(2))


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)
