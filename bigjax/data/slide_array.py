"""A slide as a tensorstore array that is never resident whole: row bands decoded as a reader asks.

Zhang et al.'s whole-slide input is one level of a slide, cropped to its tissue, padded, flipped at
random and normalised. Read whole, that is the slide in uint8 and again in float32 (3 GiB at 16,384²),
held for the whole step. Here it is a ``ts.virtual_chunked`` array instead: each chunk, a band of the
level's TIFF tile rows, is decoded from the file, cropped, padded, flipped and normalised when a
reader asks for it. A Big model reads its first layer's row bands from it (``spill.from_store``;
issue 21, goal 3: "the first layer reads its row bands straight from it, so a whole slide is never
resident"). A bounded cache keeps the last few bands, so the halo rows two conv bands share are
decoded once. ``read_whole`` gives the same values as one array, for the in-memory path.

The tissue crop (PANDA's grey-level rule, ``slides.PANDA_GREY_RANGE``) is found the same way, one band
at a time: the box is the same as that of the level read whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorstore as ts

from bigjax.data.slides import PANDA_GREY_RANGE, greyscale, open_slide, pick_level
from bigjax.train.features import normalize_host  # elementwise: a band's values are the whole's

__all__ = ["SlideImage", "locate", "as_array", "read_whole", "tissue_box", "BACKGROUND", "CACHED_BANDS"]

BACKGROUND = 255  # the padding: white, as glass is
CACHED_BANDS = 4  # decoded bands an array keeps (a conv band with its halo spans at most two)


@dataclass(frozen=True)
class SlideImage:
    """Where a slide's image lies: its ``level``, the tissue ``box`` (top, bottom, left, right) in that
    level's pixels, the padded ``shape`` (H, W) and the ``band`` rows one decode yields."""

    path: Path
    level: int
    box: tuple[int, int, int, int]
    shape: tuple[int, int]
    band: int


def tissue_box(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pixels that are tissue by the PANDA rule; all if none."""
    rows, cols = _tissue_lines(rgb)
    return _box(rows, cols, rgb.shape[:2])


def _tissue_lines(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    grey = greyscale(rgb)
    tissue = (grey >= PANDA_GREY_RANGE[0]) & (grey <= PANDA_GREY_RANGE[1])
    return tissue.any(axis=1), tissue.any(axis=0)


def _box(rows: np.ndarray, cols: np.ndarray, shape) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(rows), np.flatnonzero(cols)
    if len(rows) == 0:
        return 0, shape[0], 0, shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def locate(path, mpp: float | None, pad: int = 1) -> SlideImage:
    """The slide's level closest to ``mpp`` (None: level 0), its tissue box (read band by band) and the
    box's shape padded up to a multiple of ``pad``."""
    with open_slide(path) as slide:
        level = pick_level(slide.levels, mpp)
        (h, w), band = slide.levels[level].shape, slide.tile_rows(level)
        rows, cols = np.zeros(h, bool), np.zeros(w, bool)
        for y in range(0, h, band):
            rows[y:y + band], more = _tissue_lines(slide.read_region(level, y, 0, min(band, h - y), w))
            cols |= more
    box = _box(rows, cols, (h, w))
    shape = tuple(-(-(hi - lo) // pad) * pad for lo, hi in ((box[0], box[1]), (box[2], box[3])))
    return SlideImage(Path(path), level, box, shape, band)


def _pixels(image: SlideImage, flips: tuple[bool, bool], rows: slice, cols: slice) -> np.ndarray:
    """uint8 (rows, cols, 3) of the padded, flipped image, decoding only the slide's pixels in them."""
    (h, w), (top, bottom, left, right) = image.shape, image.box
    # the padded image's rows and columns these are (a flip reads its mirror range, reversed)
    r0, r1 = (h - rows.stop, h - rows.start) if flips[0] else (rows.start, rows.stop)
    c0, c1 = (w - cols.stop, w - cols.start) if flips[1] else (cols.start, cols.stop)
    out = np.full((r1 - r0, c1 - c0, 3), BACKGROUND, np.uint8)
    y1, x1 = min(r1, bottom - top), min(c1, right - left)  # beyond the box: padding
    if y1 > r0 and x1 > c0:
        with open_slide(image.path) as slide:  # one handle per read: tensorstore reads from threads
            out[:y1 - r0, :x1 - c0] = slide.read_region(image.level, top + r0, left + c0, y1 - r0, x1 - c0)
    return out[::-1 if flips[0] else 1, ::-1 if flips[1] else 1]


def as_array(image: SlideImage, norm, flips: tuple[bool, bool] = (False, False)) -> ts.TensorStore:
    """float32 (1, H, W, 3): ``image`` flipped by ``flips`` (rows, columns) and normalised by
    ``norm = (mean, std)``, its chunks decoded as they are read (bands of the slide's tile rows)."""
    (h, w), top = image.shape, image.box[0]
    # chunk boundaries where the slide's tile rows begin, so that a chunk decodes whole tiles
    origin = (top + h) % image.band if flips[0] else -top % image.band

    def read(domain: ts.IndexDomain, array: np.ndarray, _params) -> None:
        _, rows, cols, channels = (slice(d.inclusive_min, d.exclusive_max) for d in domain)
        array[...] = normalize_host(_pixels(image, flips, rows, cols), *norm)[None, :, :, channels]

    layout = ts.ChunkLayout(read_chunk_shape=[1, image.band, w, 3], grid_origin=[0, origin, 0, 0])
    context = ts.Context({"cache_pool": {"total_bytes_limit": CACHED_BANDS * image.band * w * 3 * 4}})
    return ts.virtual_chunked(read, dtype=ts.float32, shape=[1, h, w, 3], chunk_layout=layout,
                              context=context)


def read_whole(image: SlideImage, norm, flips: tuple[bool, bool] = (False, False)) -> np.ndarray:
    """``as_array``'s values as one float32 (1, H, W, 3) array in host memory."""
    h, w = image.shape
    return normalize_host(_pixels(image, flips, slice(0, h), slice(0, w)), *norm)[None]
