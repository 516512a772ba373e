"""Tile a data set into a tile store, or measure how fast bags read from one.

    python -m experiments.tile --layout=panda --data_dir=PANDA --out=STORE --tile_size=256 --workers=2
    python -m experiments.tile --layout=camelyon --csv=slides.csv --out=STORE --rule=camelyon --mpp=0.5
    python -m experiments.tile --layout=csv --csv=tcga_prad.csv --out=STORE        # external test set
    python -m experiments.tile --layout=synthetic --data_dir=DATA --n_slides=96 --out=STORE --tile_size=64
    python -m experiments.tile --bench --out=STORE --k=256 --n_bags=64
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from bigjax import lock
from bigjax.data import layouts
from bigjax.data.bags import measure_bag_reads
from bigjax.data.manifest import read_manifest
from bigjax.data.store import TileStore
from bigjax.data.synthetic import make_panda_like
from bigjax.data.tiling import TilingConfig, tile_dataset
from bigjax.errors import ArgumentParser, run_cli


@dataclasses.dataclass(frozen=True)
class Config:
    """Flags of this command (see --help)."""

    out: str
    layout: str = "panda"
    data_dir: str | None = None
    csv: str | None = None
    splits_csv: str | None = None
    seed: int = 0
    workers: int = 2
    n_slides: int = 96
    side: tuple[int, int] = (512, 1024)
    tiling: TilingConfig = TilingConfig()
    bench: bool = False
    k: int = 256
    n_bags: int = 64


def parse_flags(argv=None) -> Config:
    """Command-line flags -> Config."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="tile store folder")
    p.add_argument("--layout", default="panda", choices=["panda", "camelyon", "csv", "synthetic"])
    p.add_argument("--data_dir", help="PANDA folder (train.csv, train_images/); for synthetic, where to generate it")
    p.add_argument("--csv", help="CSV of slides for --layout=camelyon/csv (path, label, split, slide_id)")
    p.add_argument("--splits_csv", help="PANDA split CSV (image_id, split); default: seeded stratified 80:10:10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="tiling processes")
    p.add_argument("--n_slides", type=int, default=96, help="synthetic: number of slides")
    p.add_argument("--side", default="512,1024", type=_side, help="synthetic: min,max slide side in pixels")
    p.add_argument("--tile_size", type=int, default=256)
    p.add_argument("--rule", default="panda", choices=["panda", "camelyon"])
    p.add_argument("--mpp", type=float, help="µm per pixel to tile at (closest level); default level 0")
    p.add_argument("--base_mpp", type=float, help="µm per pixel of level 0 when a slide does not record it")
    p.add_argument("--compression", default="raw", choices=["raw", "zstd"])
    p.add_argument("--bench", action="store_true", help="measure random K-tile bag reads from --out instead")
    p.add_argument("--k", type=int, default=256, help="bench: tiles per bag")
    p.add_argument("--n_bags", type=int, default=64, help="bench: bags to read")
    a = p.parse_args(argv)
    needs = "data_dir" if a.layout in ("panda", "synthetic") else "csv"
    if not a.bench and getattr(a, needs) is None:
        p.error(f"--layout={a.layout} needs --{needs}")
    tiling = TilingConfig(tile_size=a.tile_size, rule=a.rule, mpp=a.mpp, base_mpp=a.base_mpp, compression=a.compression)
    return Config(out=a.out, layout=a.layout, data_dir=a.data_dir, csv=a.csv, splits_csv=a.splits_csv, seed=a.seed,
                  workers=a.workers, n_slides=a.n_slides, side=a.side, tiling=tiling, bench=a.bench, k=a.k,
                  n_bags=a.n_bags)


def _side(text: str) -> tuple[int, int]:
    """--side "min,max" -> (min, max) slide side in pixels."""
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two integers min,max (e.g. 512,1024)") from None
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 < min <= max")
    return lo, hi


def slides_of(config: Config) -> list[layouts.SlideEntry]:
    """The layout's slide list (generating the synthetic set first when asked)."""
    if config.layout == "synthetic":
        lo, hi = config.side
        if not (Path(config.data_dir) / "train.csv").is_file():
            make_panda_like(config.data_dir, n_slides=config.n_slides, seed=config.seed, side=(lo, hi),
                            workers=config.workers)
        return layouts.panda_layout(config.data_dir, seed=config.seed)
    if config.layout == "panda":
        return layouts.panda_layout(config.data_dir, splits_csv=config.splits_csv, seed=config.seed)
    if config.layout == "camelyon":
        return layouts.camelyon_layout(config.csv, seed=config.seed)
    return layouts.csv_layout(config.csv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_flags(argv)
    if config.bench:
        store = TileStore(config.out)
        print(json.dumps(measure_bag_reads(store, store.slides(), k=config.k, n_bags=config.n_bags, seed=config.seed)))
        return
    with lock.hold(Path(config.out) / lock.TILING_LOCK, "a tiler"):  # refused before generating data
        manifest = tile_dataset(slides_of(config), config.out, config.tiling, workers=config.workers)
    rows = read_manifest(manifest)
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "empty", "failed")}
    print(f"{manifest}: {len(rows)} slides {counts}, {sum(r.n_tiles for r in rows):,} tiles")


if __name__ == "__main__":
    sys.exit(run_cli(main))
