"""PANDA (ISUP grade 0-5, QWK): train a ResNet tile encoder end to end under a MIL aggregator.

    python -m experiments.panda --encoder=big                      # generated data, ~5 min on 2 CPUs
    python -m experiments.panda --encoder=big --data_dir=PANDA --init=resnet18.safetensors \
        --workdir=runs/panda_big                                   # real PANDA, the paper's schedule
    python -m experiments.panda --workdir=runs/panda --resume      # continue after a kill
    python -m experiments.panda --workdir=runs/panda --eval_only [--eval_manifest=TCGA/manifest.csv]

Without --data_dir the command generates a PANDA-like data set (bigjax.data.synthetic) into
<workdir>/data, tiles it into <workdir>/store and runs the quick preset (experiments.presets:
32 px tiles, 8-tile bags, 4 bags per step, ResNet-18 with 2 big stages under a 1.5 MiB partition
budget, 5 epochs, Adam 1e-3). With --data_dir the paper's: 256 px tiles, 256-tile bags, batch 2 x
accumulation 16, 20 epochs, cosine, Adam lr 1e-4 with weight decay 1e-4, ResNet-18 all big, 100 test
draws of 256 tiles.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bigjax.data import layouts
from bigjax.data.synthetic import make_panda_like
from bigjax.data.tiling import TilingConfig, tile_dataset
from bigjax.errors import run_cli
from experiments.flags import apply_flags, training_flags
from experiments.presets import Preset, panda_paper, panda_quick
from experiments.run import run, store_ready


def parse_flags(argv=None) -> argparse.Namespace:
    p = training_flags(__doc__)
    p.add_argument("--data_dir", help="PANDA folder (train.csv, train_images/); omit to generate data")
    p.add_argument("--splits_csv", help="PANDA split CSV (image_id, split); default seeded 80:10:10")
    return p.parse_args(argv)


def config_from_flags(a: argparse.Namespace) -> Preset:
    """The paper preset on real data (``--data_dir``), else the quick one; given flags override it."""
    return apply_flags(panda_paper() if a.data_dir else panda_quick(), a)


def prepare_store(a: argparse.Namespace, preset: Preset) -> None:
    """Tile PANDA (or the generated PANDA-like set, generated first) into the run's store."""
    config = preset.train
    tiling = TilingConfig(tile_size=preset.tile_size, rule="panda")
    if store_ready(preset, tiling):
        return
    data_dir = a.data_dir
    if data_dir is None:
        data_dir = Path(config.workdir) / "data"
        if not (data_dir / "train.csv").is_file():
            logging.info("generating %d PANDA-like slides into %s", preset.n_slides, data_dir)
            make_panda_like(data_dir, n_slides=preset.n_slides, seed=a.data_seed, side=preset.side,
                            workers=a.workers)
    slides = layouts.panda_layout(data_dir, splits_csv=a.splits_csv, seed=a.data_seed)
    tile_dataset(slides, config.store, tiling, workers=a.workers, progress=config.progress)


def main(argv=None) -> int:
    a = parse_flags(argv)
    preset = config_from_flags(a)
    return run(a, preset, lambda: prepare_store(a, preset))


if __name__ == "__main__":
    sys.exit(run_cli(main))
