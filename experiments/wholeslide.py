"""Whole-slide local training (Zhang et al.): entire slides at 5×, one per step, through Big-Layers.

    python -m experiments.wholeslide                                  # generated PANDA-like slides
    python -m experiments.wholeslide --data_dir=PANDA --init=resnet34.safetensors --epochs=55
    python -m experiments.wholeslide --workdir=runs/wholeslide --resume   # after a kill or Ctrl-C
    python -m experiments.wholeslide --mpp=0.5 --host_memory=8GiB --spill_dir=/tmp/spill  # 20×

Each slide is read at --magnification (5×: 2 µm/px, taking 20× as 0.5 µm/px) or at --mpp µm/px,
cropped to its tissue and trained on whole as one image, whose row bands the stem decodes from the file
as it reads them (never resident whole): ResNet-34 (stem stride 3, frozen stem, frozen
BatchNorm or GroupNorm) in --modules gradient-isolated modules with auxiliary gated-attention heads and
Random Feature Reconstruction, activations in host RAM (bigjax.local.wholeslide); with --host_memory
those beyond it spill to --spill_dir, and every epoch logs the bytes spilled, the disk's GB/s and the
peak RSS. Without --data_dir a PANDA-like set is generated (bigjax.data.synthetic) into <workdir>/data
and a CPU-sized run is made: 72 slides of 2048² px at 20× (--side; 512 px at 5×) whose tissue and tumour regions are 8x the tile set's (--region_scale: at
the tile set's 32-48 px every head position of H holds the same mix of regions, so H's per-channel
GroupNorm leaves it nothing of the grade), split 60/6/6 (one val and one test slide a grade); the
backbone with GroupNorm (Zhang's second variant: frozen BatchNorm of a random init normalises
nothing), 4 epochs, accumulation 1, AdamW lr 2e-4/5e-4 without decay (a random init, 240 updates),
2 RFR patches, slides padded to 256 px, a 64 MiB partition budget. With --data_dir the official
settings (frozen BatchNorm, 55 epochs, accumulation 8, AdamW lr 1e-5/2e-5, weight decay 1e-2,
lr x 0.1 at epochs 25, 35, 45, 10 RFR patches; slides padded to a multiple of 128 px, a 256 MiB
budget); every flag overrides either. Every epoch validates and checkpoints (the latest and the
best by validation QWK); Ctrl-C saves and stops, --resume continues; the best checkpoint gives the
final val/test figures with 95 % bootstrap intervals over slides.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from bigjax.data import layouts
from bigjax.data.synthetic import make_panda_like
from bigjax.errors import ArgumentParser, run_cli
from bigjax.local.wholeslide import WholeSlideConfig, train_wholeslide
from bigjax.logs import quiet_libraries
from bigjax.metrics import format_metric
from bigjax.train.interrupt import stop_on_interrupt
from experiments.flags import host_memory_flags

# the generated run: where it departs from the official settings, and why (docs/results.md): a
# random init (no ImageNet weights here) with GroupNorm, lr 10-25x higher, no decay and no
# accumulation, so that 240 updates learn; every slide padded to one 256 px square (one shape to
# compile); 2 RFR patches, which on so small a slide each cover much of its map; a 64 MiB budget
# still partitions the stem
QUICK = dict(epochs=4, accum=1, lr_backbone=2e-4, lr_heads=5e-4, decay_epochs=(), norm="group",
             pad=256, n_patches=2, max_partition_bytes=64 * 2**20)
# 72 slides: 60 train, 6 val, 6 test (stratified); level-0 px: 512 px at 5x, 2x2 positions for H
N_SLIDES, SIDE = 72, (2048, 2048)
REGION_SCALE = 8.0


def parse_flags(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/wholeslide", help="run folder (default runs/wholeslide)")
    p.add_argument("--data_dir", help="PANDA folder (train.csv, train_images/); omit to generate slides")
    p.add_argument("--splits_csv", help="PANDA split CSV (image_id, split); default seeded 80:10:10")
    p.add_argument("--magnification", type=float,
                   help="read slides at this magnification (default 5, i.e. 2 µm/px)")
    p.add_argument("--mpp", type=float, help="read slides at this many µm per pixel instead "
                                             "(0.5: 20×, the full resolution of PANDA's slides)")
    host_memory_flags(p)
    p.add_argument("--modules", type=int, help="K gradient-isolated modules: 1, 2, 4 (default), 8")
    p.add_argument("--alpha", type=float, help="weight of the RFR loss (default 1)")
    p.add_argument("--norm", choices=("batch", "group"),
                   help="backbone norm: frozen BatchNorm or GroupNorm(C, C), Zhang's two variants "
                        "(default: group on generated slides, batch with --data_dir)")
    p.add_argument("--n_patches", type=int, help="RFR patches per module and step (default 10)")
    p.add_argument("--head_kernel", type=int, help="side and stride of H's reducing conv (official 5)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--accum", type=int, help="slides per optimiser update (default 8)")
    p.add_argument("--lr_backbone", type=float)
    p.add_argument("--lr_heads", type=float)
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--decay_epochs", type=_epochs,
                   help="0-based epochs from which the lr is 10x smaller, e.g. 25,35,45 (default; '' for none)")
    p.add_argument("--checkpoint_every", type=int,
                   help="also checkpoint every this many slides (default 0: each epoch and on Ctrl-C)")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint")
    p.add_argument("--max_partition_bytes", type=int, help="Big-Layers partition budget")
    p.add_argument("--pad", type=int, help="pad slides to a multiple of this many pixels")
    p.add_argument("--init", help="torchvision ResNet-34 .safetensors (default: random init)")
    p.add_argument("--seed", type=int, help="training seed (default 0)")
    p.add_argument("--n_boot", type=int, help="bootstrap resamples of the final 95%% intervals (default 1000)")
    p.add_argument("--data_seed", type=int, default=0, help="seed of the generated slides and split")
    p.add_argument("--n_slides", type=int, default=N_SLIDES, help="generated slides (no --data_dir)")
    p.add_argument("--side", type=int, default=SIDE[0],
                   help=f"generated slides' side in 20× (0.5 µm/px) pixels (default {SIDE[0]}; "
                        "made once per --workdir)")
    p.add_argument("--region_scale", type=float, default=REGION_SCALE,
                   help=f"generated slides' tissue/tumour regions this many times the tile set's "
                        f"(default {REGION_SCALE:g})")
    p.add_argument("--workers", type=int, default=2, help="processes generating slides")
    p.add_argument("--no_progress", action="store_true", help="no line per slide")
    return p.parse_args(argv)


def _epochs(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(e) for e in text.split(",") if e.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give epochs as integers separated by commas") from None


def config_from_flags(a: argparse.Namespace) -> WholeSlideConfig:
    """The official settings on real data, the quick ones on generated slides; given flags override."""
    if a.side < 1:
        raise ValueError(f"--side={a.side}: must be at least 1 pixel")
    fields = {} if a.data_dir else dict(QUICK)
    fields.update({f.name: getattr(a, f.name) for f in dataclasses.fields(WholeSlideConfig)
                   if getattr(a, f.name, None) is not None})
    return WholeSlideConfig(**dict(fields, mpp=_mpp(a)))


def _mpp(a: argparse.Namespace) -> float:
    """µm per pixel to read at: --mpp, or --magnification's (10 / magnification: 20× is 0.5)."""
    if a.mpp is not None and a.magnification is not None:
        raise ValueError(f"--mpp={a.mpp} and --magnification={a.magnification}: give one of them")
    if a.mpp is not None:
        return a.mpp
    magnification = 5.0 if a.magnification is None else a.magnification
    if not magnification > 0:
        raise ValueError(f"--magnification={magnification}: must be positive")
    return 10.0 / magnification


def slides_of(a: argparse.Namespace) -> list:
    """The layout's slides: --data_dir's, or generated PANDA-like slides (made once).

    Generated sets of 6 slides a grade or more (36: 24 train, 6 val, 6 test, one of each grade)
    take the stratified 80:10:10 split; fewer are too few for it (it rounds val and test to none
    per grade): there, of every 6 slides in the table's order the 5th is val, the 6th test.
    """
    data_dir = a.data_dir
    if data_dir is not None:
        return layouts.panda_layout(data_dir, splits_csv=a.splits_csv, seed=a.data_seed)
    data_dir = Path(a.workdir) / "data"
    if not (data_dir / "train.csv").is_file():
        logging.info("generating %d PANDA-like slides into %s", a.n_slides, data_dir)
        make_panda_like(data_dir, n_slides=a.n_slides, seed=a.data_seed, side=(a.side, a.side),
                        workers=a.workers,
                        region_scale=a.region_scale)
    slides = layouts.panda_layout(data_dir, splits_csv=a.splits_csv, seed=a.data_seed)
    if a.splits_csv or {"val", "test"} <= {s.split for s in slides}:
        return slides
    split = {4: "val", 5: "test"}
    return [dataclasses.replace(s, split=split.get(i % 6, "train")) for i, s in enumerate(slides)]


def main(argv=None) -> int:
    a = parse_flags(argv)
    config = config_from_flags(a)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    quiet_libraries(log_file=Path(config.workdir) / "libraries.log")
    with stop_on_interrupt() as stop:
        results = train_wholeslide(config, slides_of(a), resume=a.resume, progress=not a.no_progress,
                                   should_stop=stop.requested)
    for split in ("val", "test"):
        r = results[split]
        if r["n"]:
            print(", ".join(format_metric(f"{split} {name}", r[key], f"{r['n']} slides", ci=r[f"{key}_ci95"])
                            for key, name in (("qwk", "QWK"), ("accuracy", "accuracy"))))
            names = [f"A_{k + 1}" for k in range(len(r["heads_qwk"]) - 1)] + ["H"]
            print(f"{split} QWK of every head: " + ", ".join(
                format_metric(name, h["qwk"], ci=h["qwk_ci95"])
                for name, h in zip(names, r["heads_qwk"])))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
