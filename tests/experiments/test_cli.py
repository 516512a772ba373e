"""The experiment CLIs: flags -> config (presets for generated vs real data, flags override)."""

import pytest

from bigjax.data.tiling import TilingConfig
from experiments import camelyon, panda


def test_panda_quick_preset_without_data_dir():
    preset = panda.config_from_flags(panda.parse_flags(["--encoder=big"]))
    config = preset.train
    assert config.workdir == "runs/panda" and config.store == "runs/panda/store"
    assert (config.tiles_per_bag, config.batch_size, config.big_stages) == (8, 4, 2)
    assert preset.tile_size == 32 and config.task == "panda"


def test_panda_paper_defaults_with_data_dir():
    preset = panda.config_from_flags(panda.parse_flags(["--data_dir=/PANDA"]))
    config, optim = preset.train, preset.train.optim
    assert preset.tile_size == 256
    assert (config.tiles_per_bag, config.batch_size, optim.accum, config.epochs) == (256, 2, 16, 20)
    assert (optim.schedule, optim.lr, optim.name, optim.weight_decay) == ("cosine", 1e-4, "adam", 1e-4)
    assert (config.eval_draws, config.eval_tiles) == (100, 256)


def test_flags_override_the_preset():
    a = panda.parse_flags(["--data_dir=/P", "--lr=5e-5", "--epochs=3", "--encoder=frozen",
                           "--aggregator=transmil", "--no-augment", "--workdir=/tmp/w",
                           "--tiles_per_bag=64", "--accum=4"])
    config = panda.config_from_flags(a).train
    assert (config.optim.lr, config.epochs, config.encoder, config.aggregator) == (
        5e-5, 3, "frozen", "transmil")
    assert config.augment is False and config.store == "/tmp/w/store" and config.tiles_per_bag == 64
    assert config.optim.accum == 4 and config.optim.schedule == "cosine"  # the rest stays the preset's


def test_camelyon_paper_defaults():
    preset = camelyon.config_from_flags(camelyon.parse_flags(["--csv=slides.csv"]))
    config = preset.train
    assert config.task == "camelyon" and config.n_classes == 2 and config.select_metric == "auc"
    assert (config.optim.name, config.optim.lr, config.tiles_per_bag) == ("demon_adam", 5e-5, 512)
    assert (config.eval_draws, config.eval_tiles) == (10, 2048) and preset.mpp == 0.5


def test_camelyon_quick_is_the_binary_stand_in():
    config = camelyon.config_from_flags(camelyon.parse_flags([])).train
    assert config.workdir == "runs/camelyon" and config.task == "camelyon"
    assert (config.optim.name, config.optim.lr, config.optim.accum) == ("demon_adam", 1e-3, 1)


def test_unknown_encoder_is_rejected():
    with pytest.raises(SystemExit):
        panda.parse_flags(["--encoder=huge"])


def test_auto_and_byte_sizes_are_read_from_the_flags():
    config = panda.config_from_flags(panda.parse_flags(
        ["--big_stages=auto", "--max_partition_bytes=64MiB", "--device_memory=8GiB"])).train
    assert (config.big_stages, config.max_partition_bytes, config.device_memory) == (
        "auto", 64 * 2**20, 8 * 2**30)
    with pytest.raises(SystemExit):
        panda.parse_flags(["--max_partition_bytes=lots"])


@pytest.mark.parametrize("flag", ["--max_partition_bytes=1000000", "--big_stages=1",
                                  "--device_memory=8GiB", "--host_dtype=bfloat16",
                                  "--big_engine=compiled"])
def test_a_streaming_flag_with_a_mode_that_does_not_stream_is_refused(flag):
    with pytest.raises(ValueError, match=rf"{flag.split('=')[0]} has no effect with --encoder=frozen"):
        panda.config_from_flags(panda.parse_flags(["--encoder=frozen", flag]))


def test_a_store_with_a_failed_slide_is_tiled_again(tmp_path):
    from bigjax.data.manifest import ManifestRow, write_manifest
    from experiments.run import store_ready

    preset = panda.config_from_flags(panda.parse_flags([f"--workdir={tmp_path}"]))
    tiling = TilingConfig(tile_size=preset.tile_size)
    assert not store_ready(preset, tiling)  # no manifest yet
    (tmp_path / "store").mkdir()
    ok = ManifestRow("a", 1, "train", 4, "ok", "slides/a", "a.tiff")
    failed = ManifestRow("b", 2, "train", 0, "failed", "", "b.tiff", "truncated")
    write_manifest(tmp_path / "store" / "manifest.csv", [ok])
    assert store_ready(preset, tiling)
    write_manifest(tmp_path / "store" / "manifest.csv", [ok, failed])
    assert not store_ready(preset, tiling)


def test_a_store_tiled_at_another_magnification_is_refused(tmp_path):
    import json

    from bigjax.data.manifest import ManifestRow, write_manifest
    from experiments.run import store_ready

    preset = panda.config_from_flags(panda.parse_flags([f"--workdir={tmp_path}"]))
    (tmp_path / "store").mkdir()
    write_manifest(tmp_path / "store" / "manifest.csv",
                   [ManifestRow("a", 1, "train", 4, "ok", "slides/a", "a.tiff")])
    (tmp_path / "store" / "tiling.json").write_text(json.dumps(
        {"tile_size": preset.tile_size, "rule": "camelyon", "mpp": 0.5, "base_mpp": None}))
    asked = TilingConfig(tile_size=preset.tile_size, rule="camelyon", mpp=1.0)
    with pytest.raises(ValueError, match=r"tiled with mpp=0.5; asked mpp=1.0"):
        store_ready(preset, asked)


def test_devices_log_every_and_sync_bn_flags_reach_the_config():
    # --devices=2: the two CPU devices tests/conftest.py already gave this process
    a = panda.parse_flags(["--encoder=inmemory", "--devices=2", "--log_every=1", "--no-sync_bn"])
    config = panda.config_from_flags(a).train
    assert (config.devices, config.log_every, config.sync_bn) == (2, 1, False)
    assert panda.config_from_flags(panda.parse_flags([])).train.devices == 1


@pytest.mark.parametrize("flags,message", [
    (["--encoder=frozen", "--devices=2"], "--devices=2 with --encoder=frozen: only the modes"),
    (["--encoder=inmemory", "--devices=3", "--processes=2"], "--devices=3 over --processes=2"),
])
def test_devices_for_a_mode_without_a_mesh_or_uneven_processes_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        panda.config_from_flags(panda.parse_flags(flags))


@pytest.mark.parametrize("flag,says", [("--init=missing.safetensors", "--init missing.safetensors: no such file"),
                                       ("--max_partition_bytes=1000", "max_partition_bytes=1,000 B is below")])
def test_what_needs_no_data_is_refused_before_data_is_generated(tmp_path, flag, says):
    import subprocess
    import sys
    from pathlib import Path

    workdir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "experiments.panda", "--encoder=big", flag,
                           f"--workdir={workdir}", "--no_progress"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert not (workdir / "data").exists() and not (workdir / "store").exists()
