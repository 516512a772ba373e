"""The whole-slide command: flags -> config, the split, a step from the slide's store, epochs at 20×."""

import numpy as np
import pytest

from bigjax.data import layouts
from bigjax.data.synthetic import make_panda_like
from bigjax.errors import run_cli
from bigjax.layers.execution import Execution
from experiments import wholeslide


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    data = make_panda_like(tmp_path_factory.mktemp("ws") / "data", n_slides=6, seed=0,
                           side=(256, 320), workers=1)
    return layouts.panda_layout(data)


def test_flags_give_the_quick_run_on_generated_slides_and_official_settings_on_real_data():
    quick = wholeslide.config_from_flags(wholeslide.parse_flags([]))
    assert (quick.epochs, quick.accum, quick.mpp, quick.modules, quick.pad) == (4, 1, 2.0, 4, 256)
    assert (quick.norm, quick.decay_epochs, quick.head_kernel) == ("group", (), 5)
    assert wholeslide.parse_flags([]).n_slides == 72  # stratified: 6 val, 6 test
    real = wholeslide.config_from_flags(wholeslide.parse_flags(
        ["--data_dir=/P", "--modules=8", "--magnification=10"]))
    assert (real.epochs, real.accum, real.lr_backbone, real.lr_heads, real.weight_decay) == (
        55, 8, 1e-5, 2e-5, 1e-2)
    assert (real.modules, real.mpp, real.pad, real.norm, real.decay_epochs) == (8, 1.0, 128, "batch",
                                                                           (25, 35, 45))


@pytest.mark.slow  # ~40 s: a ResNet-34's initialisation on the loaded 2-core machine
def test_head_kernel_flag_sets_h_reducing_conv():
    from bigjax.local.wholeslide import build_network

    config = wholeslide.config_from_flags(wholeslide.parse_flags(["--head_kernel=2", "--modules=2"]))
    head = build_network(config).local_modules[-1].head
    assert head.kernel == 2 and head.reduce.geom.kernel == (2, 2)


def test_a_few_generated_slides_still_have_val_and_test(slides, tmp_path):
    a = wholeslide.parse_flags([f"--workdir={tmp_path}"])
    (tmp_path / "data").symlink_to(slides[0].path.parent.parent)  # the fixture's 6 generated slides
    assert [s.split for s in wholeslide.slides_of(a)] == ["train"] * 4 + ["val", "test"]


def test_six_generated_slides_a_grade_take_the_stratified_split_one_val_and_test_each(tmp_path):
    make_panda_like(tmp_path / "data", n_slides=36, seed=0, side=(24, 24), workers=1)
    split = {}
    for s in wholeslide.slides_of(wholeslide.parse_flags([f"--workdir={tmp_path}"])):
        split.setdefault(s.split, []).append(s.label)
    assert sorted(split["val"]) == sorted(split["test"]) == list(range(6))
    assert sorted(split["train"]) == sorted(list(range(6)) * 4)


@pytest.mark.parametrize("flag, message", [("--modules=3", "--modules=3: must divide the 8 pieces"),
                                           ("--magnification=0", "--magnification=0.0: must be positive"),
                                           ("--accum=0", "--accum=0: must be at least 1"),
                                           ("--head_kernel=0", "--head_kernel=0: must be at least 1")])
def test_bad_flags_are_one_line_errors(flag, message, capsys, tmp_path):
    assert run_cli(wholeslide.main, [flag, f"--workdir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err


@pytest.mark.slow
def test_predict_is_the_eval_forward_through_h_on_both_paths():
    from bigjax.layers import Execution
    from bigjax.local import paths_for
    from tests.local.helpers import X, tiny_network

    net = tiny_network(4)
    logits = net.predict(paths_for(None, 4), X)
    assert logits.shape == (3,)
    big = net.predict(paths_for([Execution(b) for b in (30_000, 30_000, 40_000, 100_000)], 4), X)
    np.testing.assert_allclose(np.asarray(big), np.asarray(logits), rtol=1e-4, atol=1e-5)


def _one_step_at_20x(tmp_path, **options) -> dict:
    """One epoch of one tiny 96² slide read at 0.5 µm/px (20×), through Big-Layers (a 200 kB budget)."""
    import dataclasses as dc

    from bigjax.local.wholeslide import WholeSlideConfig, train_wholeslide
    from tests.local.helpers import tiny_network

    data = make_panda_like(tmp_path / "data", n_slides=3, seed=0, side=(96, 96), workers=1)
    slides = [dc.replace(s, split=split) for s, split in zip(layouts.panda_layout(data),
                                                              ("train", "val", "test"))]
    config = WholeSlideConfig(workdir=str(tmp_path / "run"), epochs=1, accum=1, mpp=0.5, pad=32,
                              modules=1, norm="group", n_patches=2, n_boot=5,
                              max_partition_bytes=200_000, **options)
    return train_wholeslide(config, slides, progress=False, network=tiny_network(1))


@pytest.mark.slow  # ~45 s: the tiny network's eager initialisation and its first streamed step
def test_a_20x_epoch_logs_bytes_spilled_disk_speed_and_peak_rss(tmp_path):
    import json

    results = _one_step_at_20x(tmp_path)
    assert results["largest_slide"] == (96, 96)  # level 0: 96 px at 0.5 µm/px
    use = results["host_memory"]
    assert (use["spill_written"], use["spill_read"], use["disk_gb_s"]) == (0, 0, 0.0)  # all in RAM
    assert 0 < use["peak_rss"] < 8 * 2**30
    assert use["peak_rss"] == max(use["peak_rss_training"], use["peak_rss_evaluation"])
    assert min(use["peak_rss_training"], use["peak_rss_evaluation"]) > 0
    epoch = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert epoch["kind"] == "epoch" and {"spill_written", "spill_read", "disk_gb_s", "peak_rss",
                                         "peak_rss_training", "peak_rss_evaluation"} <= set(epoch)


@pytest.mark.slow  # ~45 s, as above
def test_a_20x_epoch_over_a_tiny_host_budget_spills_and_says_so(tmp_path):
    # 16 kB: the tiny network's activations (8 kB each on its 16x16 patches) mostly spill
    results = _one_step_at_20x(tmp_path, host_memory=16_000, spill_dir=str(tmp_path / "spill"))
    use = results["host_memory"]
    assert use["spill_written"] > 0 and use["spill_read"] > 0 and use["disk_gb_s"] > 0
    left = [p for p in (tmp_path / "spill").rglob("*") if p.is_file()]
    assert not left  # the store is removed after each step


@pytest.mark.parametrize("spilled,host_dtype", [(False, None), (True, None), (False, "bfloat16")])
def test_a_step_from_the_slide_store_is_the_step_from_the_slide_read_whole(tmp_path, spilled,
                                                                           host_dtype):
    """The run's input (a tensorstore array the stem reads band by band) against the same slide read
    whole into host memory: one train step of a two-module network, losses and parameters bit for bit,
    op by op in RAM, with the streamed stem over a host budget that spills, and with bfloat16 host
    activations (both inputs rounded to them: ``Execution.input``)."""
    import jax
    from flax import nnx

    from bigjax.data.slide_array import as_array, locate, read_whole
    from bigjax.local.step import make_optimizers, train_step
    from bigjax.models.arch import IMAGENET
    from tests.local.helpers import tiny_network

    data = make_panda_like(tmp_path / "data", n_slides=1, seed=0, side=(96, 112), workers=1)
    image = locate(layouts.panda_layout(data)[0].path, 0.5, pad=32)
    options = dict(host_memory=16_000, spill_dir=str(tmp_path / "spill")) if spilled else {}
    runs, reads = [], []

    def observer(event, fn, *args, **kwargs):
        if event == "input_read":
            reads.append(args[0])  # its bytes
        return fn(*args, **kwargs)

    for x in (as_array(image, IMAGENET, (True, False)), read_whole(image, IMAGENET, (True, False))):
        net = tiny_network(2)
        ex = Execution(200_000, observer=observer, host_dtype=host_dtype, **options)
        losses = train_step(net, make_optimizers(net, lr_backbone=1e-3, lr_heads=1e-3), x, 1,
                            np.random.default_rng(0), execution=ex)
        runs.append(([float(v) for v in losses], jax.tree.leaves(nnx.state(net, nnx.Param))))
        runs[-1] += (list(reads),)
    (store_losses, store_params, store_reads), (whole_losses, whole_params, whole_reads) = runs
    assert len(store_reads) > 1 and whole_reads == store_reads  # counts of both runs: the array added none
    assert max(store_reads) < 4 * image.shape[0] * image.shape[1] * 3  # bands, never the whole slide
    assert store_losses == whole_losses
    for a, b in zip(store_params, whole_params, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
