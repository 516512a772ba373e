"""A trained run applied to new slides: predictions, per-tile scores, heatmaps and a report.

``predict(workdir, slides=..., out=...)`` restores the run's best checkpoint (``load_run``), tiles the
slides with the run's own tiling settings (the run store's ``tiling.json``: tile size, foreground rule,
µm per pixel) into ``<out>/store``, and for each slide embeds every tile in eval mode, calls the
aggregator once on all of them and keeps its per-tile scores (``bigjax.models.mil.scores``). It writes

    <out>/predictions.csv      slide_id, prediction, one probability column per class, confidence,
                               n_tiles, score, and label / correct where a label is known
    <out>/tiles/<slide>.csv    one row per tile: y, x, size (level-0 pixels), every score, and
                               tumour_fraction where a mask exists
    <out>/heatmaps/<slide>.png the default score over the slide's thumbnail (``bigjax.train.heatmap``)
    <out>/report.html          one self-contained page (``bigjax.train.html_report``)

Per-tile scores are CSV: a slide has thousands to ~10^5 tiles, a few MB of text, which every tool a
pathologist uses (pandas, R, a spreadsheet, QuPath's import) opens without bigjax; a chunked array
store (zarr) would add nothing for 1-D columns of that size and need tensorstore to read.

A slide's scores are kept as ``<out>/tiles/<slide>.csv`` + ``<slide>.json`` (probabilities and the
checkpoint step): rerunning after a Ctrl-C reuses the slides already done with the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from tqdm import tqdm

from bigjax.data.layouts import SlideEntry
from bigjax.data.manifest import ManifestRow, read_manifest, select
from bigjax.data.slides import SlideReadError, open_slide, pick_level, tile_grid
from bigjax.data.store import TileStore
from bigjax.data.tiling import TilingConfig, check_tiling, stored_tiling, tile_dataset
from bigjax.errors import Interrupted, UserError
from bigjax.models.mil import scores as mil_scores
from bigjax.train import modes, prediction_files
from bigjax.train.checkpoint import RunCheckpoints
from bigjax.train.config import TrainConfig
from bigjax.train.prediction_files import SlideScores, class_names

log = logging.getLogger(__name__)

__all__ = ["LoadedRun", "SlideScores", "read_config", "load_run", "head_of", "slide_scores", "class_names", "predict",
           "PredictOptions"]

TILE_READ = 1024  # tiles read and embedded at a time (bounds host memory on 10^5-tile slides)
TILE_CHUNK = 4  # slides tiled per worker between two looks at a Ctrl-C


@dataclasses.dataclass
class LoadedRun:
    """A run's model restored from its best checkpoint, and what predicting with it needs."""

    workdir: Path
    config: TrainConfig
    mode: modes.EncoderMode
    model: object  # steps.MILClassifier
    best_step: int
    tiling: dict  # the run store's defining tiling settings

    @property
    def default_score(self) -> str:
        return mil_scores.default_score(self.model.head)


def read_config(workdir: str | os.PathLike) -> TrainConfig:
    """The configuration of the run in ``workdir``.

    Raises:
      FileNotFoundError: no run there (naming what the folder holds).
    """
    workdir = Path(workdir)
    saved = workdir / "config.json"
    if not saved.is_file():
        held = ", ".join(sorted(p.name for p in workdir.iterdir())[:6]) if workdir.is_dir() else "no such folder"
        raise FileNotFoundError(f"--workdir {workdir} holds no run (no config.json; it has: {held or 'nothing'})")
    return TrainConfig.from_json(saved.read_text(), workdir=str(workdir), progress=False)


def load_run(workdir: str | os.PathLike) -> LoadedRun:
    """Restore the best checkpoint of the run in ``workdir``.

    Raises:
      FileNotFoundError: no run there, no best checkpoint yet (naming the steps there are), or no
        record of how the run's slides were tiled.
    """
    from bigjax.train.loop import build_model

    workdir = Path(workdir)
    config = read_config(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"run {workdir} has no best checkpoint (no checkpoints/ folder): nothing trained yet")
    tiling = stored_tiling(config.store)
    if tiling is None:
        raise FileNotFoundError(f"run {workdir}: its tile store {config.store} has no tiling.json, so the run's "
                                "tile size and foreground rule are unknown")
    mode = modes.get(config, workdir)
    quiet = logging.getLogger(modes.__name__)
    level, quiet.level = quiet.level, logging.ERROR  # "random initial weights": the checkpoint replaces them
    try:
        model = build_model(config, mode)
    finally:
        quiet.level = level
    checkpoints = RunCheckpoints(workdir)
    try:
        steps = checkpoints.latest.all_steps()
        meta = checkpoints.restore_best(model)
    finally:
        checkpoints.close()
    if meta is None:
        raise FileNotFoundError(f"run {workdir} has no best checkpoint (checkpoints: "
                                f"{', '.join(map(str, steps)) or 'none'}); train until an epoch ends")
    return LoadedRun(workdir, config, mode, model, int(meta["step"]), tiling)


def head_of(config: TrainConfig):
    """An untrained aggregator of the run's kind (what scores it has), without restoring anything."""
    from flax import nnx

    from bigjax.models import mil

    return mil.build(config.aggregator, 8, config.n_classes, rngs=nnx.Rngs(0))


def slide_scores(run: LoadedRun, store: TileStore, row: ManifestRow) -> SlideScores:
    """Embed every tile of one stored slide in eval mode, aggregate once, keep the per-tile scores."""
    n = store.num_tiles(row.slide_id)
    parts = [run.mode.embed_tiles(run.model, store.read(row.slide_id, np.arange(i, min(i + TILE_READ, n))))
             for i in range(0, n, TILE_READ)]
    features = jax.numpy.concatenate(parts) if len(parts) > 1 else parts[0]
    scores = mil_scores.tile_scores(run.model.head, features)
    meta = store.meta(row.slide_id)
    probs = np.asarray(jax.nn.softmax(scores.pop("logits")), np.float64)
    return SlideScores(row.slide_id, probs, store.coords(row.slide_id),
                       meta["tile_size"] * meta["downsample"], scores)


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """How ``predict`` draws and reports (the CLI's flags).

    Attributes:
      score: the tile score drawn (None: the head's default, ``mil.scores.default_score``).
      raw_scores: colour raw scores instead of per-slide ranks.
      heatmaps: draw heatmaps (and put them in the report).
      heatmap_side, alpha, blur, cmap, top_k: see ``bigjax.train.heatmap.draw``.
      workers: processes tiling slides.
      progress: tqdm bars.
    """

    score: str | None = None
    raw_scores: bool = False
    heatmaps: bool = True
    heatmap_side: int = 1024
    alpha: float = 0.5
    blur: float = 0.0
    cmap: str = "jet"
    top_k: int = 5
    workers: int = 1
    progress: bool = True

    def __post_init__(self):
        """Refuse a bad drawing option before any slide is read (the flag's name and value, one line)."""
        import matplotlib

        bad = {"--alpha": not 0 <= self.alpha <= 1, "--blur": self.blur < 0, "--heatmap_side": self.heatmap_side < 16,
               "--top_k": self.top_k < 0, "--workers": self.workers < 1}
        must = {"--alpha": "in 0..1", "--blur": ">= 0 (tiles)", "--heatmap_side": ">= 16 (px)", "--top_k": ">= 0",
                "--workers": ">= 1"}
        for flag, wrong in bad.items():
            if wrong:
                value = getattr(self, flag[2:])
                raise UserError(f"{flag}={value}: must be {must[flag]}")
        if self.cmap not in matplotlib.colormaps:
            raise UserError(f"--cmap={self.cmap}: not a matplotlib colour map (e.g. jet, viridis, coolwarm, inferno)")


def check_slides(entries: Sequence[SlideEntry], tiling: dict) -> None:
    """Refuse, before any work, a slide that does not open or cannot be tiled with the run's settings."""
    for entry in entries:
        try:
            with open_slide(entry.path, tiling.get("base_mpp")) as slide:
                level = pick_level(slide.levels, tiling.get("mpp"))
                if 0 in tile_grid(slide.levels[level], tiling["tile_size"]):
                    raise UserError(f"slide {entry.path}: level {level} is {slide.levels[level].shape[1]} x "
                                    f"{slide.levels[level].shape[0]} px, smaller than one "
                                    f"{tiling['tile_size']} px tile of the run")
        except SlideReadError as err:
            raise UserError(str(err)) from err
        except ValueError as err:  # no resolution metadata for the run's µm per pixel
            raise UserError(f"slide {entry.path}: {err}") from err


def tile_new_slides(run: LoadedRun, entries: Sequence[SlideEntry], out: Path, options: PredictOptions,
                    should_stop: Callable[[], bool] | None = None) -> Path:
    """Tile ``entries`` (checked by ``check_slides``) with the run's settings into ``<out>/store``; its folder.

    The slides are tiled a few at a time (``TILE_CHUNK`` per worker) so that a Ctrl-C stops after the
    current few; ``tile_dataset`` resumes a store, so the same command again tiles only the rest.

    Raises:
      Interrupted: ``should_stop()`` turned true.
    """
    store = out / "store"
    t = run.tiling
    config = TilingConfig(tile_size=t["tile_size"], rule=t["rule"], mpp=t["mpp"], base_mpp=t.get("base_mpp"))
    step = TILE_CHUNK * options.workers
    with tqdm(total=len(entries), desc="tiling slides", unit="slide", disable=not options.progress) as bar:
        for start in range(0, len(entries), step):
            tile_dataset(entries[start:start + step], store, config, workers=options.workers, progress=False)
            bar.update(len(entries[start:start + step]))
            if should_stop is not None and should_stop() and start + step < len(entries):
                raise Interrupted(f"stopped after tiling {start + step} of {len(entries)} slides into {store}; "
                                  "run the same command again to finish (tiled slides are reused)")
    manifest = tile_dataset(entries, store, config, workers=options.workers, progress=False)  # all done: the manifest
    failed = [r for r in read_manifest(manifest) if r.status == "failed"]
    if failed:
        raise UserError(f"tiling failed for {len(failed)} slide(s): {failed[0].error}")
    return store


def stored_rows(run: LoadedRun, store: Path, split: str | None = None) -> list[ManifestRow]:
    """The slides with tiles (of ``split`` when given) of a store the run may read (tiled as the run was)."""
    t = run.tiling
    check_tiling(store, tile_size=t["tile_size"], rule=t["rule"], mpp=t["mpp"])
    rows = read_manifest(store / "manifest.csv", n_classes=None)
    for r in rows:
        if r.status == "empty":
            log.warning("slide %s: no tissue tile; not predicted", r.slide_id)
    return select(rows, split)


def score_all(run: LoadedRun, store: Path, rows: Sequence[ManifestRow], out: Path, progress: bool,
              should_stop: Callable[[], bool] | None = None) -> list[SlideScores]:
    """Every slide's scores (reusing those saved with this checkpoint), saved as each slide ends.

    Raises:
      Interrupted: ``should_stop()`` turned true; the slides done so far are saved.
    """
    tiles = TileStore(store)
    done = []
    for i, row in enumerate(tqdm(rows, desc="predicting", unit="slide", disable=not progress)):
        result = prediction_files.load_slide(out, row.slide_id, run.best_step)
        if result is None:
            result = slide_scores(run, tiles, row)
            prediction_files.save_slide(out, result, run.best_step)
        done.append(result)
        if should_stop is not None and should_stop() and i + 1 < len(rows):
            raise Interrupted(f"stopped after {i + 1} of {len(rows)} slides; their scores are in {out / 'tiles'}; "
                              "run the same command again to finish (done slides are reused)")
    return done


def predict(workdir: str | os.PathLike, *, entries: Sequence[SlideEntry] | None = None,
            store: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
            split: str | None = None, masks: dict[str, tuple[Path, str]] | None = None,
            labels: dict[str, int] | None = None, options: PredictOptions = PredictOptions(),
            should_stop: Callable[[], bool] | None = None) -> dict:
    """Predict slides with the best checkpoint of a run and write every output (see the module doc).

    Args:
      workdir: the run.
      entries: slides to tile (labels NO_LABEL when unknown); or
      store: an existing tile store (its manifest's slides, tiled with the run's settings).
      split: only the store's slides of this split (e.g. the run's own "test").
      out: output folder (default ``<workdir>/predictions``).
      masks: slide_id -> (mask file, provider) for the slides that have a PANDA label mask.
      labels: slide_id -> class, replacing the entries' or store's label of those slides
        (``bigjax.train.prediction_labels.read_labels``).
      options: see ``PredictOptions``.
      should_stop: polled after each slide scored and every few tiled (Ctrl-C).
    Returns:
      the report's summary (metrics, localisation, files written).
    """
    config = read_config(workdir)
    head = head_of(config)
    score = options.score or mil_scores.default_score(head)
    prediction_files.check_score(head, score, options.heatmaps, config.aggregator)
    tiling = stored_tiling(config.store)
    if entries is not None and tiling is not None:  # load_run says when the run's tiling is unknown
        check_slides(entries, tiling)
    run = load_run(workdir)
    out = Path(out) if out else Path(workdir) / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    store = Path(store) if store is not None else tile_new_slides(run, entries, out, options, should_stop)
    labels = labels or {}
    rows = [dataclasses.replace(r, label=labels.get(r.slide_id, r.label)) for r in stored_rows(run, store, split)]
    if not rows:
        raise UserError(f"no slide with tissue tiles to predict in {store}")
    results = score_all(run, store, rows, out, options.progress, should_stop)
    return prediction_files.write_outputs(run, store, rows, results, out, score, masks or {}, options)
