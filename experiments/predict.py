"""Apply a trained run to slides: predictions.csv, per-tile scores, heatmaps and report.html.

    python -m experiments.predict --workdir=runs/panda                          # the run's own test slides
    python -m experiments.predict --workdir=runs/panda --data_dir=PANDA         # a PANDA-layout folder
    python -m experiments.predict --workdir=runs/panda --slides a.tiff b.svs    # any slides, no labels
    python -m experiments.predict --workdir=runs/panda --slides a.tiff --labels=PANDA/train.csv  # labelled
    python -m experiments.predict --workdir=runs/panda --manifest=STORE/manifest.csv  # a tiled store

The slides are tiled with the run's own settings (tile size, foreground rule, µm per pixel) into
<out>/store, the best checkpoint is restored and every tile of each slide is scored (bigjax.train.predict).
Outputs go to --out (default <workdir>/predictions): predictions.csv, tiles/<slide>.csv,
heatmaps/<slide>.png, report.html. Labels are used where known (a PANDA train.csv, a manifest, or
--labels: a CSV slide_id,label or PANDA's train.csv, see bigjax.train.prediction_labels);
PANDA label masks (train_label_masks/) give the localisation of tumour by the tile scores.
Ctrl-C stops after the current slide (while tiling: the current few); the same command again reuses
the slides tiled and scored.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bigjax.data import layouts
from bigjax.data.manifest import NO_LABEL, read_manifest, select
from bigjax.data.masks import mask_path, providers
from bigjax.errors import ArgumentParser, run_cli, UserError
from bigjax.logs import quiet_libraries
from bigjax.train.interrupt import stop_on_interrupt
from bigjax.train.predict import PredictOptions, class_names, predict, read_config
from bigjax.train.prediction_labels import read_labels

SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".bif")
POSITIVE_GRADE = 3  # experiments.camelyon's binary labels of generated slides: ISUP >= 3


def parse_flags(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the trained run (config.json, checkpoints/)")
    given = p.add_mutually_exclusive_group()
    given.add_argument("--data_dir", help="a PANDA-layout folder (train.csv, train_images/), or a folder of slides")
    given.add_argument("--slides", nargs="+", help="slide files")
    given.add_argument("--manifest", help="a tile store's manifest.csv (tiled with the run's settings)")
    p.add_argument("--out", help="output folder (default <workdir>/predictions)")
    p.add_argument("--labels", help="CSV of slide_id,label (class index or name: an ISUP grade, normal/tumour) "
                                    "or PANDA's train.csv (image_id, isup_grade): replaces known labels")
    p.add_argument("--score", help="tile score to draw (default: the aggregator's: attention, or "
                                   "instance / cam scores of mean/max pooling and DTFD)")
    p.add_argument("--raw_scores", "--raw", action="store_true", help="colour raw scores, not per-slide ranks")
    p.add_argument("--no_heatmaps", action="store_true")
    p.add_argument("--heatmap_side", type=int, default=1024, help="heatmap thumbnail's long side (px)")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap colour opacity (0..1)")
    p.add_argument("--blur", type=float, default=0.0, help="heatmap Gaussian blur sigma, in tiles")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map")
    p.add_argument("--top_k", type=int, default=5, help="top and bottom tiles shown under each heatmap")
    p.add_argument("--workers", type=int, default=1, help="processes tiling slides")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def slides_from_flags(a: argparse.Namespace, task: str) -> list[layouts.SlideEntry] | None:
    """The slides to tile (None: --manifest, or the run's own test slides)."""
    if a.slides:
        missing = [s for s in a.slides if not Path(s).is_file()]
        if missing:
            raise UserError(f"slide {missing[0]}: no such file")
        return [layouts.SlideEntry(Path(s).stem, Path(s), NO_LABEL, "test") for s in a.slides]
    if a.data_dir is None:
        return None
    data = Path(a.data_dir)
    if not data.is_dir():
        raise UserError(f"--data_dir={data}: no such folder")
    if (data / "train.csv").is_file():
        entries = layouts.panda_layout(data)
        if task == "camelyon":  # the generated stand-in's binary labels
            entries = [layouts.SlideEntry(e.slide_id, e.path, int(e.label >= POSITIVE_GRADE), "test") for e in entries]
        return [layouts.SlideEntry(e.slide_id, e.path, e.label, "test") for e in entries if e.path.is_file()]
    files = sorted(p for p in data.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
    if not files:
        raise UserError(f"--data_dir={data}: no train.csv and no slide files ({', '.join(SLIDE_SUFFIXES)})")
    return [layouts.SlideEntry(p.stem, p, NO_LABEL, "test") for p in files]


def masks_of(sources: dict[str, Path]) -> dict[str, tuple[Path, str]]:
    """slide_id -> (PANDA mask, provider) for the slides in a PANDA layout that have one."""
    found = {}
    for slide_id, source in sources.items():
        path = mask_path(source, slide_id)
        if path is not None:
            found[slide_id] = (path, providers(Path(source).parent.parent).get(slide_id, "radboud"))
    return found


def main(argv=None) -> int:
    a = parse_flags(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    quiet_libraries()
    options = PredictOptions(score=a.score, raw_scores=a.raw_scores, heatmaps=not a.no_heatmaps,
                             heatmap_side=a.heatmap_side, alpha=a.alpha, blur=a.blur, cmap=a.cmap, top_k=a.top_k,
                             workers=a.workers, progress=not a.no_progress)
    config = read_config(a.workdir)
    entries = slides_from_flags(a, config.task)
    # no slides given: the run's own test slides
    manifest = a.manifest or (None if entries is not None else config.manifest_path)
    if manifest is not None and not Path(manifest).is_file():
        raise UserError(f"--manifest={manifest}: no such file")
    rows = [] if manifest is None else read_manifest(manifest)
    split = "test" if a.manifest is None and entries is None else None
    sources = {e.slide_id: e.path for e in entries} if entries is not None else {r.slide_id: Path(r.source) for r in rows}
    labels = None
    if a.labels:
        ids = list(sources) if entries is not None else [r.slide_id for r in select(rows, split)]
        labels = read_labels(a.labels, ids, class_names(config.task, config.n_classes), grade_cut=POSITIVE_GRADE)
    with stop_on_interrupt() as stop:
        summary = predict(a.workdir, entries=entries, store=None if manifest is None else Path(manifest).parent,
                          out=a.out, split=split, masks=masks_of(sources), labels=labels, options=options,
                          should_stop=stop.requested)
    print(_summary_line(summary, a.out or Path(a.workdir) / "predictions"))
    return 0


def _summary_line(summary: dict, out) -> str:
    parts = [f"{summary['slides']} slides predicted into {out}"]
    parts += [f"{name} {m['value']:.3f} [95% CI {m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
              for name, m in summary["metrics"].items()]
    parts += [f"localisation AUC of {kind} {loc['auc']:.3f} [95% CI {loc['ci95'][0]:.3f}, {loc['ci95'][1]:.3f}]"
              for kind, loc in summary.get("localisation", {}).items()]
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(run_cli(main))
