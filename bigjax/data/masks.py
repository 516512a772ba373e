"""PANDA label masks: where the tumour is, per tile.

PANDA ships `train_label_masks/<image_id>_mask.tiff` beside `train_images/`: an RGB pyramid with the
image's levels whose red channel holds a class label per pixel, in one of two conventions named by
`train.csv`'s `data_provider`:

- radboud: 0 background, 1 stroma, 2 benign epithelium, 3-5 Gleason patterns 3-5 (tumour: 3, 4, 5);
- karolinska: 0 background, 1 benign tissue, 2 cancer (tumour: 2).

The generated PANDA-like set (`bigjax.data.synthetic`) writes Radboud masks. `tile_tumour_fraction`
reads a mask at a coarse level (a tile spans at least `MIN_MASK_PIXELS` mask pixels a side, so a
gigapixel mask is never read whole at full resolution) and gives each tile the share of its
footprint that is tumour.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from bigjax.data.slides import open_slide

TUMOUR_LABELS = {"radboud": (3, 4, 5), "karolinska": (2,)}
MASK_FOLDER = "train_label_masks"
MIN_MASK_PIXELS = 8  # mask pixels across one tile at the level read


def mask_path(slide_path: str | os.PathLike, slide_id: str) -> Path | None:
    """The PANDA mask of a slide at `<data>/train_images/<id>.tiff`: `<data>/train_label_masks/<id>_mask.tiff`,
    or None when there is none."""
    path = Path(slide_path).parent.parent / MASK_FOLDER / f"{slide_id}_mask.tiff"
    return path if path.is_file() else None


def providers(data_dir: str | os.PathLike) -> dict[str, str]:
    """image_id -> data_provider from a PANDA `train.csv` ({} without that file or column)."""
    table = Path(data_dir) / "train.csv"
    if not table.is_file():
        return {}
    with open(table, newline="") as f:
        return {r["image_id"]: r["data_provider"] for r in csv.DictReader(f) if r.get("data_provider")}


def read_labels(path: str | os.PathLike, max_downsample: float) -> tuple[np.ndarray, float]:
    """The mask's labels (h, w) uint8 at its coarsest level of downsample <= `max_downsample`, and that downsample."""
    with open_slide(path) as mask:
        fine_enough = [i for i, level in enumerate(mask.levels) if level.downsample <= max_downsample]
        level = fine_enough[-1] if fine_enough else 0
        h, w = mask.levels[level].shape
        return mask.read_region(level, 0, 0, h, w)[..., 0], mask.levels[level].downsample


def tile_tumour_fraction(path: str | os.PathLike, coords: np.ndarray, tile_size: float,
                         provider: str = "radboud") -> np.ndarray:
    """Share of tumour pixels in each tile's footprint, float64 (N,).

    Args:
      path: the mask file.
      coords: int (N, 2) (y, x) of each tile's top-left corner in level-0 pixels (a tile store's coords).
      tile_size: a tile's side in level-0 pixels.
      provider: "radboud" or "karolinska", the label convention.
    """
    if provider not in TUMOUR_LABELS:
        raise ValueError(f"mask {path}: data_provider {provider!r}; expected one of {tuple(TUMOUR_LABELS)}")
    labels, d = read_labels(path, tile_size / MIN_MASK_PIXELS)
    tumour = np.isin(labels, TUMOUR_LABELS[provider]).astype(np.float64)
    integral = np.pad(tumour.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = tumour.shape
    y0 = np.clip(np.rint(coords[:, 0] / d).astype(int), 0, h)
    x0 = np.clip(np.rint(coords[:, 1] / d).astype(int), 0, w)
    y1 = np.clip(np.rint((coords[:, 0] + tile_size) / d).astype(int), 0, h)
    x1 = np.clip(np.rint((coords[:, 1] + tile_size) / d).astype(int), 0, w)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = (y1 - y0) * (x1 - x0)  # a tile beyond the mask's edge (a smaller mask) has no tumour
    return np.where(area > 0, inside / np.maximum(area, 1), 0.0)
