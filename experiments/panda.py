"""PANDA (ISUP grade 0-5, QWK): train a ResNet tile encoder end to end under a MIL aggregator.

    python -m experiments.panda --encoder=big                      # generated data, ~5 min on 2 CPUs
    python -m experiments.panda --encoder=big --data_dir=PANDA --init=resnet18.safetensors \
        --workdir=runs/panda_big                                   # real PANDA, the paper's schedule
    python -m experiments.panda --workdir=runs/panda --resume      # continue after a kill
    python -m experiments.panda --workdir=runs/panda --eval_only [--eval_manifest=TCGA/manifest.csv]

Without --data_dir the command generates a PANDA-like data set (bigjax.data.synthetic) into
<workdir>/data, tiles it into <workdir>/store and runs a short schedule (32 px tiles, 8-tile bags,
4 bags per step, ResNet-18 with 2 big stages under a 1.5 MiB partition budget, 5 epochs, Adam 1e-3). With --data_dir the
defaults are the paper's: 256 px tiles, 256-tile bags, batch 2 x accumulation 16, 20 epochs, cosine,
Adam lr 1e-4 with weight decay 1e-4, ResNet-18 all big, 100 test draws of 256 tiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from bigjax.data import layouts
from bigjax.data.synthetic import make_panda_like
from bigjax.data.tiling import TilingConfig, tile_dataset
from bigjax.train.config import TrainConfig
from bigjax.train.loop import NonFiniteLossError, evaluate_run, train

# the paper's PANDA setting (real data)
PAPER = dict(optimizer="adam", weight_decay=1e-4, tile_size=256, tiles_per_bag=256, batch_size=2,
             accum=16, epochs=20, schedule="cosine", lr=1e-4, big_stages=4, max_partition_bytes=256 * 2**20, eval_draws=100, eval_tiles=256,
             val_draws=1, val_tiles=0, embed_chunk=64, workdir="runs/panda_real")
# the quick run on generated data: sized to finish in about 5 minutes on a 2-core CPU
# (bags of 4 slides per step: BatchNorm statistics then span slides, not one slide's tiles)
QUICK = dict(optimizer="adam", weight_decay=1e-4, tile_size=32, tiles_per_bag=8, batch_size=4,
             accum=1, epochs=5, schedule="cosine", lr=1e-3, big_stages=2, max_partition_bytes=3 * 2**19, eval_draws=20, eval_tiles=8,
             val_draws=4, val_tiles=8, embed_chunk=128, workdir="runs/panda",
             n_slides=96, side=(384, 640))


def parse_flags(argv=None) -> argparse.Namespace:
    p = training_flags(__doc__, PAPER, QUICK)
    p.add_argument("--data_dir", help="PANDA folder (train.csv, train_images/); omit to generate data")
    p.add_argument("--splits_csv", help="PANDA split CSV (image_id, split); default seeded 80:10:10")
    return p.parse_args(argv)


def training_flags(doc: str, paper: dict, quick: dict) -> argparse.ArgumentParser:
    """The flags every experiment shares (model, optimiser, schedule, run control)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="tile store to use/create (default <workdir>/store)")
    p.add_argument("--workdir", help=f"run folder (default {quick['workdir']}, or {paper['workdir']} "
                                     "with real data)")
    p.add_argument("--encoder", default="big", choices=["big", "inmemory", "frozen", "precomputed"])
    p.add_argument("--aggregator", default="abmil")
    p.add_argument("--depth", type=int, default=18, choices=[18, 34, 50])
    p.add_argument("--big_stages", type=int)
    p.add_argument("--max_partition_bytes", type=int)
    p.add_argument("--init", help="torchvision/timm ResNet .safetensors (default: random init)")
    p.add_argument("--optimizer", choices=["adam", "adamw", "demon_adam"])
    p.add_argument("--lr", type=float)
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--schedule", choices=["constant", "cosine", "exponential"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--accum", type=int)
    p.add_argument("--tiles_per_bag", type=int)
    p.add_argument("--tile_size", type=int)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0, help="training seed: init, bag order, draws")
    p.add_argument("--data_seed", type=int, default=0,
                   help="seed of the generated data set and of the default split (kept apart from "
                        "--seed so that seeds compare models on the same data)")
    p.add_argument("--eval_draws", type=int)
    p.add_argument("--eval_tiles", type=int)
    p.add_argument("--checkpoint_every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    p.add_argument("--eval_only", action="store_true", help="restore the best checkpoint and evaluate")
    p.add_argument("--eval_manifest", help="with --eval_only: the test slides of another store's manifest")
    p.add_argument("--workers", type=int, default=2, help="processes generating/tiling slides")
    p.add_argument("--no_progress", action="store_true")
    return p


def config_from_flags(a: argparse.Namespace, task: str = "panda", paper: dict = PAPER,
                      quick: dict = QUICK, real: bool | None = None) -> tuple[TrainConfig, dict]:
    """Flags over the preset (``quick`` on generated data, ``paper`` on real data) -> (config, preset)."""
    real = bool(a.data_dir) if real is None else real
    preset = dict(paper if real else quick)
    given = {k: v for k, v in vars(a).items() if v is not None}
    merged = {**preset, **given}
    workdir = merged["workdir"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in merged.items() if k in fields - {"store"}},
                         store=a.store or str(Path(workdir) / "store"), task=task,
                         progress=not a.no_progress)
    return config, merged


def prepare_store(a: argparse.Namespace, config: TrainConfig, preset: dict) -> None:
    """Tile PANDA (or the generated PANDA-like set, generated first) into the run's store."""
    if (config.manifest_path).is_file():
        return
    data_dir = a.data_dir
    if data_dir is None:
        data_dir = Path(config.workdir) / "data"
        if not (data_dir / "train.csv").is_file():
            logging.info("generating %d PANDA-like slides into %s", preset["n_slides"], data_dir)
            make_panda_like(data_dir, n_slides=preset["n_slides"], seed=a.data_seed,
                            side=preset["side"], workers=a.workers)
    slides = layouts.panda_layout(data_dir, splits_csv=a.splits_csv, seed=a.data_seed)
    tile_dataset(slides, config.store, TilingConfig(tile_size=preset["tile_size"], rule="panda"),
                 workers=a.workers, progress=config.progress)


def main(argv=None) -> int:
    a = parse_flags(argv)
    config, preset = config_from_flags(a)
    return run(a, config, lambda: prepare_store(a, config, preset))


def run(a: argparse.Namespace, config: TrainConfig, prepare) -> int:
    """--eval_only, or prepare the store and train; a NaN/inf loss exits with status 1 and its message."""
    # force: a library imported earlier may have configured the root logger (INFO lines were lost)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    if a.eval_only:
        evaluate_run(config.workdir, manifest=a.eval_manifest, progress=config.progress)
        return 0
    prepare()
    try:
        train(config, resume=a.resume)
    except NonFiniteLossError as err:
        logging.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
