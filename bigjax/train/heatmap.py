"""Tile scores drawn over a slide's thumbnail, at a pyramid level (never a full-resolution canvas).

``draw(slide_path, coords, tile_size, scores, ...)`` reads the coarsest pyramid level at least
``side`` pixels across (the slide's own pyramid, as CLAM and TRIDENT draw), shrinks it to ``side``,
paints each tile's score in a colour map over it (rank-normalised per slide by default: a tile's
colour is its score's percentile among the slide's tiles, as CLAM's heatmaps; raw scores on request),
optionally blurred and with a chosen opacity, outlines the tissue, and adds a colour bar and a strip of
the top-k and bottom-k tiles. The image is a PIL image whose thumbnail sits at ``(0, HEADER)``.

Memory is the thumbnail level read once plus a few ``side``-sized canvases: a 100,000 px slide with
levels at downsample 4 and 16 reads a 6,250 px level (~120 MB), never its 30 GB level 0.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage, stats

from bigjax.data.slides import PANDA_GREY_RANGE, greyscale, open_slide

__all__ = ["draw", "rank_normalise", "score_canvas", "thumbnail", "HEADER", "BAR"]

HEADER = 22  # px of title above the thumbnail
BAR = 64  # px of colour bar and its labels right of the thumbnail
STRIP_TILE = 72  # px of each top/bottom tile in the strip


def rank_normalise(scores: np.ndarray) -> np.ndarray:
    """Each score's rank among the slide's scores, scaled to (0, 1] (ties share their mean rank)."""
    scores = np.asarray(scores, np.float64)
    return stats.rankdata(scores) / max(len(scores), 1)


def thumbnail(slide_path: str | os.PathLike, side: int) -> tuple[np.ndarray, float]:
    """uint8 (h, w, 3) image of the slide at most ``side`` px on its long side, read from the coarsest
    pyramid level still that large, and its scale (level-0 px per thumbnail px)."""
    with open_slide(slide_path) as slide:
        h0, w0 = slide.levels[0].shape
        big_enough = [i for i, lvl in enumerate(slide.levels) if max(lvl.shape) >= min(side, max(h0, w0))]
        level = big_enough[-1] if big_enough else 0
        h, w = slide.levels[level].shape
        image = slide.read_region(level, 0, 0, h, w)
    shrink = min(1.0, side / max(h, w))
    size = (max(1, round(w * shrink)), max(1, round(h * shrink)))
    if size != (w, h):
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    return image, max(h0, w0) / max(image.shape[:2])


def score_canvas(shape: tuple[int, int], scale: float, coords: np.ndarray, tile_size: float,
                 values: np.ndarray, blur: float = 0.0) -> np.ndarray:
    """float (h, w): each tile's value over its footprint, NaN where there is no tile.

    Args:
      shape: the thumbnail's (h, w).
      scale: level-0 px per thumbnail px.
      coords: int (N, 2) level-0 (y, x) of the tiles (a grid of step ``tile_size``).
      tile_size: a tile's side in level-0 px.
      values: (N,) the values to paint.
      blur: Gaussian sigma in tiles (0: sharp tiles); NaN stays NaN, values are not smeared into it.
    """
    cells = np.rint(np.asarray(coords) / tile_size).astype(int)
    grid_shape = (cells[:, 0].max() + 2, cells[:, 1].max() + 2) if len(cells) else (1, 1)
    grid = np.full(grid_shape, np.nan)
    grid[cells[:, 0], cells[:, 1]] = values
    rows = np.minimum((np.arange(shape[0]) + 0.5) * scale / tile_size, grid_shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * scale / tile_size, grid_shape[1] - 1).astype(int)
    canvas = grid[rows][:, cols]
    if blur > 0:
        covered = np.isfinite(canvas)
        sigma = blur * tile_size / scale
        weight = ndimage.gaussian_filter(covered.astype(np.float64), sigma)
        smooth = ndimage.gaussian_filter(np.where(covered, canvas, 0.0), sigma)
        canvas = np.where(covered, smooth / np.maximum(weight, 1e-12), np.nan)
    return canvas


def draw(slide_path: str | os.PathLike, coords: np.ndarray, tile_size: float, scores: np.ndarray, *,
         tiles: np.ndarray | None = None, side: int = 1024, alpha: float = 0.5, blur: float = 0.0,
         cmap: str = "jet", raw: bool = False, top_k: int = 5, title: str = "") -> Image.Image:
    """The heatmap of one slide's tile scores (see the module doc).

    Args:
      slide_path: the slide file (its pyramid gives the thumbnail).
      coords, tile_size: the tiles' level-0 (y, x) and side.
      scores: (N,) the tile scores.
      tiles: uint8 (N, T, T, 3) tile images for the top/bottom strip (None: no strip); only the
        2 * top_k shown are read, so pass a lazy indexable (``TileImages``) for big slides.
      side: the thumbnail's long side in px.
      alpha: opacity of the colours over the thumbnail (0..1).
      blur: Gaussian sigma in tiles.
      cmap: a matplotlib colour map name.
      raw: colour raw scores (min..max of the slide) instead of per-slide ranks.
      top_k: tiles at each end of the strip.
      title: text above the thumbnail.
    """
    import matplotlib

    if not 0 <= alpha <= 1:
        raise ValueError(f"--alpha={alpha}: must be in 0..1")
    colours = matplotlib.colormaps[cmap]
    scores = np.asarray(scores, np.float64)
    image, scale = thumbnail(slide_path, side)
    lo, hi = (float(scores.min()), float(scores.max())) if raw else (0.0, 1.0)
    values = (scores - lo) / (hi - lo) if raw and hi > lo else (np.zeros_like(scores) if raw else rank_normalise(scores))
    canvas = score_canvas(image.shape[:2], scale, coords, tile_size, values, blur)
    covered = np.isfinite(canvas)
    rgb = colours(np.nan_to_num(canvas))[..., :3] * 255
    out = np.where(covered[..., None], (1 - alpha) * image + alpha * rgb, image)
    out[_outline(image)] = (20, 20, 20)
    page = _page(out.astype(np.uint8), colours, lo, hi, raw, title)
    if tiles is not None and top_k > 0 and len(scores):
        page = _with_strip(page, scores, tiles, top_k)
    return page


class TileImages:
    """Lazy tile images of one stored slide: ``images[indices]`` reads only those tiles."""

    def __init__(self, store, slide_id: str):
        self.store, self.slide_id = store, slide_id

    def __getitem__(self, indices) -> np.ndarray:
        return self.store.read(self.slide_id, np.sort(np.asarray(indices)))[np.argsort(np.argsort(indices))]


def _outline(image: np.ndarray) -> np.ndarray:
    """bool (h, w): the tissue's boundary, 2 px wide. Tissue is not-white and not-black (PANDA's grey
    range), smoothed: Otsu's split would cut a slide that is all tissue in two."""
    lo, hi = PANDA_GREY_RANGE
    grey = greyscale(image)
    tissue = ndimage.binary_opening(ndimage.binary_closing((grey >= lo) & (grey <= hi), iterations=2), iterations=2)
    return tissue & ~ndimage.binary_erosion(tissue, iterations=2, border_value=1)


def _page(heat: np.ndarray, colours, lo: float, hi: float, raw: bool, title: str) -> Image.Image:
    """The heatmap with its title above and a labelled colour bar to its right."""
    h, w = heat.shape[:2]
    page = Image.new("RGB", (w + BAR, h + HEADER), "white")
    page.paste(Image.fromarray(heat), (0, HEADER))
    bar_h = max(h - 20, 10)
    ramp = colours(np.linspace(1, 0, bar_h))[:, :3] * 255
    page.paste(Image.fromarray(np.repeat(ramp[:, None], 14, 1).astype(np.uint8)), (w + 8, HEADER + 10))
    pen, font = ImageDraw.Draw(page), ImageFont.load_default()
    top, bottom = (f"{hi:.3g}", f"{lo:.3g}") if raw else ("top", "bottom")
    pen.text((w + 25, HEADER + 6), top, fill="black", font=font)
    pen.text((w + 25, HEADER + bar_h), bottom, fill="black", font=font)
    pen.text((w + 25, HEADER + bar_h // 2), "raw" if raw else "rank", fill="black", font=font)
    pen.text((4, 4), title, fill="black", font=font)
    return page


def _with_strip(page: Image.Image, scores: np.ndarray, tiles: Sequence, top_k: int) -> Image.Image:
    """The page with a strip below: the top-k tiles (highest first), then the bottom-k (lowest last)."""
    order = np.argsort(-scores, kind="stable")
    k = min(top_k, len(order) // 2 or 1)
    picks = [("top", order[:k]), ("bottom", order[::-1][:k][::-1])]
    width = max(page.width, (2 * k) * (STRIP_TILE + 4) + 40)
    strip = Image.new("RGB", (width, STRIP_TILE + 18), "white")
    pen, font, x = ImageDraw.Draw(strip), ImageFont.load_default(), 0
    for name, indices in picks:
        pen.text((x + 2, 2), f"{name} {k}", fill="black", font=font)
        for image in tiles[indices]:
            strip.paste(Image.fromarray(image).resize((STRIP_TILE, STRIP_TILE)), (x, 16))
            x += STRIP_TILE + 4
        x += 32
    full = Image.new("RGB", (width, page.height + strip.height), "white")
    full.paste(page, (0, 0))
    full.paste(strip, (0, page.height))
    return full
