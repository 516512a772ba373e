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

import argparse
import dataclasses
import sys
from pathlib import Path

from bigjax.data import layouts
from bigjax.data.synthetic import make_panda_like
from bigjax.data.tiling import TilingConfig, tile_dataset
from bigjax.errors import run_cli
from experiments.flags import apply_flags, training_flags
from experiments.presets import Preset, camelyon_paper, camelyon_quick
from experiments.run import run, store_ready

POSITIVE_GRADE = 3  # generated stand-in: ISUP grade >= 3 is the positive class


def parse_flags(argv=None) -> argparse.Namespace:
    p = training_flags(__doc__)
    p.add_argument("--csv", help="CAMELYON slide CSV (path, label[, slide_id, split]); omit for the "
                                 "generated stand-in")
    p.add_argument("--data_dir", help="folder that the CSV's relative paths are under")
    p.add_argument("--mpp", type=float, help="µm per pixel to tile at (default 0.5 on real data)")
    return p.parse_args(argv)


def config_from_flags(a: argparse.Namespace) -> Preset:
    """The paper preset on real slides (``--csv``), else the generated stand-in; flags override."""
    preset = apply_flags(camelyon_paper() if a.csv else camelyon_quick(), a)
    return preset if a.mpp is None else dataclasses.replace(preset, mpp=a.mpp)


def slides_of(a: argparse.Namespace, preset: Preset) -> list[layouts.SlideEntry]:
    """The CAMELYON layout, or the generated PANDA-like slides with binary labels."""
    if a.csv:
        return layouts.camelyon_layout(a.csv, root=a.data_dir, seed=a.data_seed)
    data_dir = Path(preset.train.workdir) / "data"
    if not (data_dir / "train.csv").is_file():
        make_panda_like(data_dir, n_slides=preset.n_slides, seed=a.data_seed, side=preset.side,
                        workers=a.workers)
    return [dataclasses.replace(s, label=int(s.label >= POSITIVE_GRADE))
            for s in layouts.panda_layout(data_dir, seed=a.data_seed)]


def prepare_store(a: argparse.Namespace, preset: Preset) -> None:
    config = preset.train
    tiling = TilingConfig(tile_size=preset.tile_size, rule="camelyon" if a.csv else "panda",
                          mpp=preset.mpp if a.csv else None)
    if store_ready(preset, tiling):
        return
    tile_dataset(slides_of(a, preset), config.store, tiling, workers=a.workers,
                 progress=config.progress)


def main(argv=None) -> int:
    a = parse_flags(argv)
    preset = config_from_flags(a)
    return run(a, preset, lambda: prepare_store(a, preset))


if __name__ == "__main__":
    sys.exit(run_cli(main))
