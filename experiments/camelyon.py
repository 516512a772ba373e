"""CAMELYON16/17 (metastasis yes/no; accuracy, AUC): the PANDA experiment's loop on the binary task.

    python -m experiments.camelyon --csv=camelyon16.csv --init=resnet18.safetensors \
        --workdir=runs/camelyon_big                       # real slides, the paper's setting
    python -m experiments.camelyon --encoder=big          # generated stand-in, a few minutes on a CPU
    python -m experiments.camelyon --workdir=W --eval_only [--eval_manifest=EXTERNAL/manifest.csv]

--csv lists slides (path, label[, slide_id, split]; paths relative to --data_dir or the CSV's
folder); without a split column 50 label-stratified slides become validation. The paper's setting:
tiles of 256 px at 0.5 µm/px with the CAMELYON foreground rule, 512-tile bags, DEMON Adam at lr
5e-5, and a test protocol of 10 draws of 2048 tiles besides all tiles.

Without --csv there is no CAMELYON data here, so the command generates the PANDA-like set and
makes it binary (ISUP grade >= 3, i.e. most tissue tumour, vs the rest): the same code path on a
task with two classes, not a CAMELYON result.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from bigjax.data import layouts
from bigjax.data.synthetic import make_panda_like
from bigjax.data.tiling import TilingConfig, tile_dataset
from experiments.panda import QUICK as PANDA_QUICK
from experiments.panda import config_from_flags, run, training_flags

PAPER = dict(optimizer="demon_adam", weight_decay=0.0, tile_size=256, mpp=0.5, tiles_per_bag=512,
             batch_size=2, accum=16, epochs=20, schedule="constant", lr=5e-5, big_stages=4,
             max_partition_bytes=256 * 2**20, eval_draws=10, eval_tiles=2048, val_draws=1,
             val_tiles=0, embed_chunk=64, workdir="runs/camelyon_real")
QUICK = {**PANDA_QUICK, "workdir": "runs/camelyon", "optimizer": "demon_adam", "lr": 1e-3,
         "weight_decay": 0.0, "schedule": "constant"}
POSITIVE_GRADE = 3  # generated stand-in: ISUP grade >= 3 is the positive class


def parse_flags(argv=None):
    p = training_flags(__doc__, PAPER, QUICK)
    p.add_argument("--csv", help="CAMELYON slide CSV (path, label[, slide_id, split]); omit for the "
                                 "generated stand-in")
    p.add_argument("--data_dir", help="folder that the CSV's relative paths are under")
    p.add_argument("--mpp", type=float, help="µm per pixel to tile at (default 0.5 on real data)")
    return p.parse_args(argv)


def slides_of(a, config, preset) -> list[layouts.SlideEntry]:
    """The CAMELYON layout, or the generated PANDA-like slides with binary labels."""
    if a.csv:
        return layouts.camelyon_layout(a.csv, root=a.data_dir, seed=a.data_seed)
    data_dir = Path(config.workdir) / "data"
    if not (data_dir / "train.csv").is_file():
        make_panda_like(data_dir, n_slides=preset["n_slides"], seed=a.data_seed,
                        side=preset["side"], workers=a.workers)
    return [dataclasses.replace(s, label=int(s.label >= POSITIVE_GRADE))
            for s in layouts.panda_layout(data_dir, seed=a.data_seed)]


def prepare_store(a, config, preset) -> None:
    if config.manifest_path.is_file():
        return
    rule = "camelyon" if a.csv else "panda"
    mpp = preset.get("mpp") if a.csv else None
    tile_dataset(slides_of(a, config, preset), config.store,
                 TilingConfig(tile_size=preset["tile_size"], rule=rule, mpp=mpp),
                 workers=a.workers, progress=config.progress)


def main(argv=None) -> int:
    a = parse_flags(argv)
    config, preset = config_from_flags(a, task="camelyon", paper=PAPER, quick=QUICK,
                                       real=bool(a.csv))
    return run(a, config, lambda: prepare_store(a, config, preset))


if __name__ == "__main__":
    sys.exit(main())
