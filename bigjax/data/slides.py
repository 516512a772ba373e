"""Read whole-slide images (tifffile, or OpenSlide where installed) and pick tiles of tissue.

A slide is a pyramid of levels. `open_slide` returns a reader with `levels` (shape, downsample,
µm per pixel) and `read_region(level, y, x, h, w) -> uint8 (h, w, 3)`. `foreground_tiles` walks
one level in bands of tile rows and yields only the tiles that pass a foreground rule:

- PANDA: keep a tile when >= 60 % of its pixels have greyscale intensity in [3, 230].
- CAMELYON: tissue mask by Otsu's threshold on HSV saturation at the lowest-resolution level; keep
  a tile when >= 50 % of its footprint is tissue.

Only whole tiles are used (the ragged right and bottom edges are dropped), so tiles never overlap
and never need padding. Samples of more than 8 bits (16-bit, 12-bit in 16) are scaled to 8 bits,
v × 255 / (2^bits − 1) rounded; float or signed samples are refused, naming the file.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
PANDA_GREY_RANGE = (3, 230)
PANDA_MIN_FRACTION = 0.6
CAMELYON_MIN_FRACTION = 0.5
RULES = ("panda", "camelyon")


class SlideReadError(Exception):
    """A slide that is missing, truncated or unreadable; the message names the file."""


class Level(NamedTuple):
    """One pyramid level: its (height, width), downsample from level 0, and µm per pixel (or None)."""

    shape: tuple[int, int]
    downsample: float
    mpp: float | None


def open_slide(path: str | os.PathLike, base_mpp: float | None = None) -> "TiffSlide | OpenSlideSlide":
    """Open a slide with tifffile (.tif/.tiff) or OpenSlide (other formats, if installed).

    Args:
      path: the slide file.
      base_mpp: µm per pixel of level 0, used only when the file does not record it.

    Raises:
      SlideReadError: the file is missing, not a slide, or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideReadError(f"slide {path}: no such file")
    if path.suffix.lower() in TIFF_SUFFIXES:
        return TiffSlide(path, base_mpp)
    return OpenSlideSlide(path, base_mpp)


def pick_level(levels: list[Level], mpp: float | None) -> int:
    """Index of the level whose µm per pixel is closest (in ratio) to `mpp`; level 0 when `mpp` is None."""
    if mpp is None:
        return 0
    if levels[0].mpp is None:
        raise ValueError(f"no resolution metadata (µm per pixel), cannot pick the level for {mpp} µm/px; pass base_mpp")
    ratios = [abs(np.log(level.mpp / mpp)) for level in levels]
    best = int(np.argmin(ratios))
    if ratios[best] > np.log(1.25):
        log.warning("closest level has %.3f µm/px, requested %.3f µm/px", levels[best].mpp, mpp)
    return best


class TiffSlide:
    """A pyramidal (or flat) TIFF read with tifffile, decoding only the TIFF tiles/strips a region needs."""

    def __init__(self, path: Path, base_mpp: float | None = None):
        import tifffile

        self.path = path
        _check_tiff_header(path)
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as err:  # tifffile raises many types on corrupt files
            raise SlideReadError(f"slide {path}: unreadable TIFF ({err})") from err
        try:
            self._read_levels(path, base_mpp)
        except BaseException:
            self._tif.close()  # a refused slide keeps no file open (tiling goes on to thousands)
            raise

    def _read_levels(self, path: Path, base_mpp: float | None) -> None:
        try:
            self._pages = _level_pages(self._tif)
        except SlideReadError:
            raise
        except Exception as err:
            raise SlideReadError(f"slide {path}: unreadable TIFF ({err})") from err
        _check_data_in_file(path, self._pages)
        self._bits = [_bits_per_sample(path, page) for page in self._pages]
        mpp0 = _tiff_mpp(self._pages[0]) or base_mpp
        h0, w0 = self._pages[0].shape[:2]
        self.levels = []
        for page in self._pages:
            d = _downsample(h0 / page.shape[0], w0 / page.shape[1])
            mpp = _tiff_mpp(page) or (None if mpp0 is None else mpp0 * d)
            self.levels.append(Level((page.shape[0], page.shape[1]), d, mpp))

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """RGB pixels [y:y+h, x:x+w] of `level` as uint8 (h, w, 3), in that level's pixel coordinates."""
        page = self._pages[level]
        ch, cw = page.chunks[0], page.chunks[1]
        ny, nx = page.chunked[0], page.chunked[1]
        rows = range(y // ch, min((y + h - 1) // ch + 1, ny))
        cols = range(x // cw, min((x + w - 1) // cw + 1, nx))
        indices = [r * nx + c for r in rows for c in cols]
        offsets = [page.dataoffsets[i] for i in indices]
        counts = [page.databytecounts[i] for i in indices]
        out = np.full((h, w, 3), 255, np.uint8)
        fh = self._tif.filehandle
        for (data, index) in fh.read_segments(offsets, counts, indices=indices, sort=True):
            chunk = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)[0]
            chunk = _to_rgb(chunk.reshape(chunk.shape[-3:]), self._bits[level])
            cy, cx = (index // nx) * ch, (index % nx) * cw
            chunk = chunk[:page.shape[0] - cy, :page.shape[1] - cx]  # drop the edge tiles' padding
            _paste(out, chunk, cy - y, cx - x)
        return out

    def tile_rows(self, level: int) -> int:
        """Rows of `level` one decode yields (its TIFF tiles' or strips' height)."""
        return int(self._pages[level].chunks[0])

    def close(self) -> None:
        self._tif.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class OpenSlideSlide:
    """A vendor-format slide read with OpenSlide (`pip install bigjax[openslide]`).

    OpenSlide addresses regions in level-0 pixels; at a level whose downsample is not an integer
    the region may be resampled by a fraction of a pixel (level 0 is read exactly).
    """

    def __init__(self, path: Path, base_mpp: float | None = None):
        try:
            import openslide
        except ImportError as err:
            raise SlideReadError(f"slide {path}: needs OpenSlide (pip install openslide-python openslide-bin)") from err
        self.path = path
        try:
            self._slide = openslide.OpenSlide(str(path))
        except Exception as err:
            raise SlideReadError(f"slide {path}: unreadable by OpenSlide ({err})") from err
        mpp_x = self._slide.properties.get("openslide.mpp-x")
        mpp0 = float(mpp_x) if mpp_x else base_mpp
        self.levels = [
            Level((h, w), float(d), None if mpp0 is None else mpp0 * float(d))
            for (w, h), d in zip(self._slide.level_dimensions, self._slide.level_downsamples)
        ]

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """RGB pixels [y:y+h, x:x+w] of `level` as uint8 (h, w, 3), in that level's pixel coordinates."""
        d = self.levels[level].downsample
        rgba = self._slide.read_region((int(x * d), int(y * d)), level, (w, h))
        rgba = np.asarray(rgba)
        # transparent (outside the scanned area) pixels are white background
        return np.where(rgba[..., 3:] == 0, 255, rgba[..., :3]).astype(np.uint8)

    def tile_rows(self, level: int) -> int:
        """Rows of `level` one decode yields (OpenSlide's tile height where the format names one)."""
        return int(self._slide.properties.get(f"openslide.level[{level}].tile-height", 256))

    def close(self) -> None:
        self._slide.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def greyscale(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma as uint8, exactly as Pillow's `convert("L")` rounds it."""
    rgb = rgb.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)


def panda_foreground(tiles: np.ndarray) -> np.ndarray:
    """PANDA rule on uint8 (N, T, T, 3) tiles: bool (N,), >= 60 % of pixels with greyscale in [3, 230]."""
    grey = greyscale(tiles)
    lo, hi = PANDA_GREY_RANGE
    fraction = ((grey >= lo) & (grey <= hi)).mean(axis=(1, 2))
    return fraction >= PANDA_MIN_FRACTION


def otsu_tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Tissue mask of a low-resolution RGB image: HSV saturation above Otsu's threshold."""
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    saturation = rgb2hsv(rgb)[..., 1]
    if np.ptp(saturation) < 1e-3:  # a blank slide: nothing to separate
        return np.zeros(saturation.shape, bool)
    return saturation > threshold_otsu(saturation)


def tile_grid(level: Level, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of whole, non-overlapping tiles that fit in `level`."""
    return level.shape[0] // tile_size, level.shape[1] // tile_size


def camelyon_keep(slide, level: int, tile_size: int) -> np.ndarray:
    """CAMELYON rule: bool (rows, cols) grid, tiles whose footprint is >= 50 % Otsu tissue."""
    low = len(slide.levels) - 1
    thumb_level = slide.levels[low]
    mask = otsu_tissue_mask(slide.read_region(low, 0, 0, *thumb_level.shape)).astype(np.float64)
    rows, cols = tile_grid(slide.levels[level], tile_size)
    scale = tile_size * slide.levels[level].downsample / thumb_level.downsample
    integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    y0 = np.floor(np.arange(rows) * scale).astype(int)
    y1 = np.maximum(np.minimum(np.ceil((np.arange(rows) + 1) * scale).astype(int), mask.shape[0]), y0 + 1)
    x0 = np.floor(np.arange(cols) * scale).astype(int)
    x1 = np.maximum(np.minimum(np.ceil((np.arange(cols) + 1) * scale).astype(int), mask.shape[1]), x0 + 1)
    y0, y1 = np.minimum(y0, mask.shape[0] - 1), np.minimum(y1, mask.shape[0])
    x0, x1 = np.minimum(x0, mask.shape[1] - 1), np.minimum(x1, mask.shape[1])
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    tissue = (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0])
    return tissue / area >= CAMELYON_MIN_FRACTION


def foreground_tiles(slide, level: int, tile_size: int, rule: str = "panda") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Walk `level` one band of tile rows at a time; yield (tiles uint8 (n, T, T, 3), coords int64 (n, 2)).

    coords are (y, x) of each tile's top-left corner in `level`'s pixels, in row-major order.
    Memory is one band (tile_size × level width), so gigapixel slides stream.
    """
    if rule not in RULES:
        raise ValueError(f"foreground rule {rule!r}: expected one of {RULES}")
    rows, cols = tile_grid(slide.levels[level], tile_size)
    keep_grid = camelyon_keep(slide, level, tile_size) if rule == "camelyon" and rows * cols else None
    t = tile_size
    for r in range(rows):
        if keep_grid is not None and not keep_grid[r].any():
            continue
        band = slide.read_region(level, r * t, 0, t, cols * t)
        tiles = band.reshape(t, cols, t, 3).transpose(1, 0, 2, 3)
        keep = keep_grid[r] if keep_grid is not None else panda_foreground(tiles)
        kept = np.flatnonzero(keep)
        if kept.size:
            coords = np.stack([np.full(kept.size, r * t), kept * t], axis=1).astype(np.int64)
            yield np.ascontiguousarray(tiles[kept]), coords


def _check_tiff_header(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if size < 8:
        raise SlideReadError(f"slide {path}: not a TIFF (truncated at byte {size:,})")
    if head[:2] not in (b"II", b"MM"):
        raise SlideReadError(f"slide {path}: not a TIFF (starts with {head!r})")


def _check_data_in_file(path: Path, pages) -> None:
    size = path.stat().st_size
    for page in pages:
        end = max(o + c for o, c in zip(page.dataoffsets, page.databytecounts))
        if end > size or 0 in page.databytecounts:
            raise SlideReadError(f"slide {path}: truncated (file has {size:,} bytes, tile data reaches byte {end:,})")


def _level_pages(tif) -> list:
    """Pages of the pyramid, largest first: the first series' levels, else same-kind smaller series."""
    series = tif.series[0]
    pages = [lvl.keyframe for lvl in series.levels]
    if len(pages) == 1:
        h0, w0 = pages[0].shape[:2]
        smaller = [s.keyframe for s in tif.series[1:] if s.keyframe.ndim == pages[0].ndim
                   and s.keyframe.shape[0] < h0 and s.keyframe.shape[1] < w0]
        pages += sorted(smaller, key=lambda p: -p.shape[1])
    for page in pages:
        if page.planarconfig == 2 and page.samplesperpixel > 1:
            raise SlideReadError(f"slide {tif.filename}: planar-separate TIFF is not supported")
    return pages


def _tiff_mpp(page) -> float | None:
    """µm per pixel from the TIFF resolution tags, None when they are absent or unitless."""
    tag, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if tag is None or unit is None or int(unit.value) not in (2, 3):
        return None
    num, den = tag.value
    if num == 0 or num == den:
        return None
    return (25400.0 if int(unit.value) == 2 else 10000.0) * den / num


def _downsample(ratio_h: float, ratio_w: float) -> float:
    """A level's downsample from its size ratios, snapped to the integer it was made with (sizes are floored)."""
    d = (ratio_h + ratio_w) / 2
    return float(round(d)) if abs(d - round(d)) < 0.1 * d else d


def _bits_per_sample(path: Path, page) -> int:
    """Bits per sample of an unsigned-integer page (8 to 16); other sample types raise SlideReadError."""
    bits = page.bitspersample
    bits = bits[0] if isinstance(bits, tuple) else int(bits)
    if page.dtype is None or page.dtype.kind != "u" or not 8 <= bits <= 16:
        raise SlideReadError(f"slide {path}: {bits}-bit {page.dtype} samples are not supported "
                             f"(unsigned integers of 8 to 16 bits)")
    return bits


def _to_rgb(chunk: np.ndarray, bits: int = 8) -> np.ndarray:
    """A decoded (h, w, s) chunk as uint8 RGB: grey is repeated, alpha dropped, > 8 bits scaled to 8."""
    if chunk.shape[-1] == 1:
        chunk = np.repeat(chunk, 3, axis=-1)
    chunk = chunk[..., :3]
    if bits > 8:  # v * 255 / (2**bits - 1), rounded; without this uint16 wraps mod 256
        chunk = np.rint(chunk.astype(np.float32) * (255 / (2 ** bits - 1)))
    return chunk.astype(np.uint8, copy=False)


def _paste(out: np.ndarray, chunk: np.ndarray, dy: int, dx: int) -> None:
    """Copy `chunk` into `out` at offset (dy, dx), clipping what falls outside."""
    y0, x0 = max(dy, 0), max(dx, 0)
    y1, x1 = min(dy + chunk.shape[0], out.shape[0]), min(dx + chunk.shape[1], out.shape[1])
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = chunk[y0 - dy:y1 - dy, x0 - dx:x1 - dx]
