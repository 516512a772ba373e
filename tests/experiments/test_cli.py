"""The experiment CLIs: flags -> config (presets for generated vs real data, flags override)."""

import pytest

from experiments import camelyon, panda


def test_panda_quick_preset_without_data_dir():
    config, preset = panda.config_from_flags(panda.parse_flags(["--encoder=big"]))
    assert config.workdir == "runs/panda" and config.store == "runs/panda/store"
    assert (config.tiles_per_bag, config.batch_size, config.big_stages) == (8, 4, 2)
    assert preset["tile_size"] == 32 and config.task == "panda"


def test_panda_paper_defaults_with_data_dir():
    config, preset = panda.config_from_flags(panda.parse_flags(["--data_dir=/PANDA"]))
    assert preset["tile_size"] == 256
    assert (config.tiles_per_bag, config.batch_size, config.accum, config.epochs) == (256, 2, 16, 20)
    assert (config.schedule, config.lr, config.optimizer, config.weight_decay) == ("cosine", 1e-4, "adam", 1e-4)
    assert (config.eval_draws, config.eval_tiles) == (100, 256)


def test_flags_override_the_preset():
    a = panda.parse_flags(["--data_dir=/P", "--lr=5e-5", "--epochs=3", "--encoder=frozen",
                           "--aggregator=transmil", "--no-augment", "--workdir=/tmp/w", "--tiles_per_bag=64"])
    config, _ = panda.config_from_flags(a)
    assert (config.lr, config.epochs, config.encoder, config.aggregator) == (5e-5, 3, "frozen", "transmil")
    assert config.augment is False and config.store == "/tmp/w/store" and config.tiles_per_bag == 64


def test_camelyon_paper_defaults():
    a = camelyon.parse_flags(["--csv=slides.csv"])
    config, preset = camelyon.config_from_flags(a, task="camelyon", paper=camelyon.PAPER,
                                                quick=camelyon.QUICK, real=True)
    assert config.task == "camelyon" and config.n_classes == 2 and config.select_metric == "auc"
    assert (config.optimizer, config.lr, config.tiles_per_bag) == ("demon_adam", 5e-5, 512)
    assert (config.eval_draws, config.eval_tiles) == (10, 2048) and preset["mpp"] == 0.5


def test_unknown_encoder_is_rejected():
    with pytest.raises(SystemExit):
        panda.parse_flags(["--encoder=huge"])
