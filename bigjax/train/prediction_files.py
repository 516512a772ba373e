"""The files ``bigjax.train.predict`` writes: per-slide scores, predictions.csv, heatmaps, summary.

Per slide: ``tiles/<slide>.csv`` (y, x, size in level-0 px, then every per-tile score; (N, C) scores
as ``name_0..name_{C-1}``; ``tumour_fraction`` where a mask exists) and ``tiles/<slide>.json``
(class probabilities, the checkpoint step, the score names), so a rerun reuses finished slides.

``SlideScores`` (one slide's result) and ``class_names`` live here, below ``bigjax.train.predict``,
which imports this module and is never imported by it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from bigjax import metrics
from bigjax.data.masks import tile_tumour_fraction
from bigjax.data.store import TileStore
from bigjax.errors import UserError
from bigjax.models.mil import scores as mil_scores
from bigjax.train import heatmap, html_report
from bigjax.train.evaluate import METRIC_NAMES, TASK_METRICS, score as metric_score


@dataclasses.dataclass
class SlideScores:
    """One slide's prediction and per-tile scores."""

    slide_id: str
    probs: np.ndarray  # (C,)
    coords: np.ndarray  # int64 (N, 2) level-0 (y, x)
    tile_size: float  # a tile's side in level-0 pixels
    scores: dict[str, np.ndarray]  # name -> (N,) or (N, C)


def class_names(task: str, n_classes: int) -> list[str]:
    """Names of the classes in predictions.csv: ISUP grades 0-5 for PANDA, normal/tumour for CAMELYON."""
    if task == "camelyon":
        return ["normal", "tumour"]
    return [str(c) for c in range(n_classes)]


def check_score(head, score: str, heatmaps: bool, aggregator: str) -> None:
    """Refuse a tile score the head does not have, or that cannot be drawn, naming those it has."""
    names = mil_scores.score_names(head)
    if score not in names:
        raise UserError(f"--score={score}: aggregator {aggregator} has no such tile score; it has "
                        f"{', '.join(names)}")
    if heatmaps and score not in mil_scores.informative_scores(head):
        raise UserError(f"--score={score}: aggregator {aggregator} has no attention to draw (it weighs every "
                        f"tile 1/N); draw --score={mil_scores.default_score(head)}, or pass --no_heatmaps")


def _tiles_csv(out: Path, slide_id: str) -> Path:
    return out / "tiles" / f"{slide_id}.csv"


def save_slide(out: Path, result, step: int, fraction: np.ndarray | None = None) -> None:
    """Write a slide's tile CSV (temp name, then rename) and its JSON."""
    folder = out / "tiles"
    folder.mkdir(parents=True, exist_ok=True)
    columns = {"y": result.coords[:, 0], "x": result.coords[:, 1],
               "size": np.full(len(result.coords), result.tile_size), **mil_scores.as_columns(result.scores)}
    if fraction is not None:
        columns["tumour_fraction"] = fraction
    path = _tiles_csv(out, result.slide_id)
    tmp = path.with_name(path.name + ".tmp")
    table = np.column_stack([np.asarray(v, np.float64) for v in columns.values()])
    np.savetxt(tmp, table, delimiter=",", header=",".join(columns), comments="", fmt="%.6g")
    tmp.replace(path)
    shapes = {name: list(np.shape(v)) for name, v in result.scores.items()}
    (folder / f"{result.slide_id}.json").write_text(json.dumps(
        {"slide_id": result.slide_id, "step": step, "probs": result.probs.tolist(),
         "tile_size": result.tile_size, "scores": shapes}))


def load_slide(out: Path, slide_id: str, step: int):
    """A slide's saved scores when they came from checkpoint ``step``, else None."""
    meta_path, path = out / "tiles" / f"{slide_id}.json", _tiles_csv(out, slide_id)
    if not (meta_path.is_file() and path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta["step"] != step:
        return None
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    with open(path) as f:
        header = f.readline().strip().split(",")
    column = {name: table[:, i] for i, name in enumerate(header)}
    scores = {}
    for name, shape in meta["scores"].items():
        scores[name] = (np.stack([column[f"{name}_{c}"] for c in range(shape[1])], 1) if len(shape) == 2
                        else column[name])
    coords = np.stack([column["y"], column["x"]], 1).astype(np.int64)
    return SlideScores(slide_id, np.asarray(meta["probs"]), coords, float(meta["tile_size"]), scores)


def write_predictions(path: Path, rows, results, names: Sequence[str], score: str) -> None:
    """predictions.csv: one row per slide (label and correct left empty where no label is known)."""
    with open(path.with_name(path.name + ".tmp"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "prediction", *(f"p_{n}" for n in names), "confidence", "n_tiles",
                         "score", "label", "correct"])
        for row, r in zip(rows, results):
            pred = int(np.argmax(r.probs))
            known = row.label >= 0
            writer.writerow([row.slide_id, names[pred], *(f"{p:.6f}" for p in r.probs), f"{r.probs.max():.6f}",
                             len(r.coords), score, names[row.label] if known else "",
                             int(pred == row.label) if known else ""])
    path.with_name(path.name + ".tmp").replace(path)


def labelled_metrics(task: str, labels: np.ndarray, probs: np.ndarray) -> dict:
    """The task's metrics over the labelled slides, each with its 95 % bootstrap interval."""
    known = labels >= 0
    if not known.any():
        return {}
    y, p, c = labels[known], probs[known], probs.shape[1]
    out = {}
    for m in TASK_METRICS[task]:
        value = metric_score(m, y, p, c)
        ci = metrics.bootstrap_ci(lambda yy, pp, m=m: metric_score(m, yy, pp, c), y, p)
        out[METRIC_NAMES[m]] = {"value": value, "ci95": ci}
    return out


def localisations(results: Sequence[SlideScores], fractions: dict[str, np.ndarray],
                  kinds: Sequence[str]) -> dict[str, dict]:
    """Per tile-score kind (attention, instance, cam: those the head has), the localisation of tumour
    over the slides with a mask (``bigjax.metrics.localisation``: mean per-slide AUC, 95 % bootstrap
    interval over slides).

    Returns:
      kind -> {"auc", "ci95", "slides" (with a defined AUC), "slides_with_mask"}, in ``kinds``' order.
    """
    with_mask = [r for r in results if r.slide_id in fractions]
    truth = [fractions[r.slide_id] for r in with_mask]
    found = {}
    for kind in kinds:
        loc = metrics.localisation([r.scores[kind] for r in with_mask], truth)
        found[kind] = {"auc": loc.mean, "ci95": loc.ci, "slides": loc.n_slides, "slides_with_mask": len(with_mask)}
    return found


def write_outputs(run, store: Path, rows, results, out: Path, score: str, masks: dict, options) -> dict:
    """Tumour fractions (where masks exist), predictions.csv, heatmaps, report.html and summary.json."""
    names = class_names(run.config.task, run.config.n_classes)
    fractions = {}
    for row, r in zip(rows, results):
        if row.slide_id in masks:
            path, provider = masks[row.slide_id]
            fractions[row.slide_id] = tile_tumour_fraction(path, r.coords, r.tile_size, provider)
            save_slide(out, r, run.best_step, fractions[row.slide_id])
    write_predictions(out / "predictions.csv", rows, results, names, score)
    labels = np.array([row.label for row in rows])
    probs = np.stack([r.probs for r in results])
    summary = {"run": str(run.workdir), "checkpoint_step": run.best_step, "slides": len(rows), "score": score,
               "classes": names, "metrics": labelled_metrics(run.config.task, labels, probs)}
    if fractions:
        summary["localisation"] = localisations(results, fractions, mil_scores.informative_scores(run.model.head))
    images = draw_heatmaps(store, rows, results, out, score, options) if options.heatmaps else {}
    html_report.write(out / "report.html", run, summary, rows, results, labels, images)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def draw_heatmaps(store: Path, rows, results, out: Path, score: str, options) -> dict[str, Path]:
    """heatmaps/<slide>.png for every slide; slide_id -> its file."""
    tiles, folder, written = TileStore(store), out / "heatmaps", {}
    folder.mkdir(exist_ok=True)
    for row, r in tqdm(list(zip(rows, results)), desc="heatmaps", unit="slide", disable=not options.progress):
        image = heatmap.draw(row.source, r.coords, r.tile_size, r.scores[score],
                             tiles=heatmap.TileImages(tiles, row.slide_id), side=options.heatmap_side,
                             alpha=options.alpha, blur=options.blur, cmap=options.cmap, raw=options.raw_scores,
                             top_k=options.top_k, title=f"{row.slide_id}: {score}"
                             + (" (raw)" if options.raw_scores else " (rank)"))
        written[row.slide_id] = folder / f"{row.slide_id}.png"
        image.save(written[row.slide_id])
    return written
