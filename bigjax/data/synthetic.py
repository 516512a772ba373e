"""A generated PANDA-like data set: real pyramidal TIFF slides whose ISUP grade is written in texture.

Each slide is tissue on a white background. Tissue is stroma (smooth, low-contrast streaks) and,
in a share that grows with the grade, tumour: gland-like rings of nuclei (grades 1-3) that give
way to disordered, densely scattered nuclei (grades 3-5). All three textures mix the same two
stain colours around the *same* mean, and every slide gets its own random stain shift, so mean
colour says nothing about the grade; a model has to see texture. Textures repeat every 10-16 px,
so they are visible in 32 px tiles. Tissue and tumour regions are blobs of 32-48 px, a mix finer
than one position of a whole-slide network's head; `region_scale` enlarges them (not the textures),
for whole slides read at 5× (bigjax.local.wholeslide).

The files follow the PANDA layout (`train.csv` + `train_images/<image_id>.tiff`, levels at
downsample 1, 4, 16 with JPEG-compressed 256 px TIFF tiles and resolution tags), so the very same
read -> tile -> store -> bags path runs on them. Each slide also gets its label mask,
`train_label_masks/<image_id>_mask.tiff`, in PANDA's own format and the Radboud convention (the
label in the red channel of an RGB pyramid with the image's levels, lossless): background 0, stroma
1, gland-like tumour 3 (Gleason pattern 3: glands still formed), disordered tumour 4 (pattern 4:
fused, poorly formed glands), or 5 on grade-5 slides (the one grade whose Gleason score, 4+5, has a
pattern 5). Label 2 (benign epithelium) is never written: the generator has no benign glands. So
every slide's `data_provider` is "radboud", and `bigjax.data.masks` reads these masks and real
PANDA's alike.
"""
from __future__ import annotations

import csv
import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

GRADES = 6
TUMOUR_SHARE = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8)  # share of tissue with tumour texture, by ISUP grade
DISORDERED_SHARE = (0.0, 0.0, 0.15, 0.4, 0.7, 0.95)  # share of tumour that is disordered, by grade
GLEASON = ("0+0", "3+3", "3+4", "4+3", "4+4", "4+5")
PROVIDER = "radboud"  # the masks' label convention (bigjax.data.masks)
STROMA, GLAND_LIKE, DISORDERED = 1, 3, 4  # Radboud labels of the generator's regions (5: grade 5)
PINK = np.array([232.0, 150.0, 196.0])  # eosin
PURPLE = np.array([96.0, 52.0, 140.0])  # haematoxylin
MIX_MEAN = 0.4  # every texture's mean purple fraction: the mean-colour balance
BACKGROUND = 243.0
DOWNSAMPLES = (1, 4, 16)


def make_panda_like(out_dir: str | os.PathLike, *, n_slides: int = 96, seed: int = 0,
                    side: tuple[int, int] = (512, 1024), mpp: float = 0.5, workers: int = 2,
                    region_scale: float = 1.0) -> Path:
    """Write a PANDA-layout data set of generated slides, balanced over ISUP grades 0-5.

    Args:
      out_dir: folder to create; gets `train.csv`, `train_images/<image_id>.tiff` and
        `train_label_masks/<image_id>_mask.tiff`.
      n_slides: number of slides (grades cycle 0..5, then are shuffled).
      seed: every pixel and label is a function of (seed, slide index).
      side: inclusive range of slide height and width in level-0 pixels.
      mpp: µm per level-0 pixel written in the resolution tags.
      workers: processes that render and write slides.
      region_scale: tissue, tumour and disordered regions this many times larger (textures unchanged).

    Returns:
      `out_dir` as a Path.
    """
    if not region_scale > 0:
        raise ValueError(f"region_scale={region_scale}: must be positive")
    out = Path(out_dir)
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    (out / "train_label_masks").mkdir(exist_ok=True)
    grades = np.random.default_rng([seed, 0]).permutation(np.arange(n_slides) % GRADES)
    jobs = [(out, seed, i, int(g), side, mpp, region_scale) for i, g in enumerate(grades)]
    if workers > 1:
        # spawn, not fork: the caller may hold JAX or tensorstore threads
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_write_one, jobs))
    else:
        rows = [_write_one(job) for job in jobs]
    tmp = out / "train.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, ["image_id", "data_provider", "isup_grade", "gleason_score"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "train.csv")
    return out


def render_slide(rng: np.random.Generator, grade: int, height: int, width: int,
                 region_scale: float = 1.0) -> tuple[np.ndarray, dict]:
    """Render one slide of `grade` as uint8 (height, width, 3) plus its masks (regions `region_scale`
    times the default 48/40/32 px blobs).

    Returns:
      (rgb, masks) with masks["tissue"], masks["tumour"], masks["disordered"] bool (height, width).
    """
    shape, k = (height, width), region_scale
    tissue = _blobs(rng, shape, scale=48 * k, share=rng.uniform(0.4, 0.6))
    tumour = tissue & _blobs(rng, shape, scale=40 * k, share=_jitter(rng, TUMOUR_SHARE[grade]), within=tissue)
    disordered = tumour & _blobs(rng, shape, scale=32 * k, share=_jitter(rng, DISORDERED_SHARE[grade]),
                                 within=tumour)
    mix = _stroma(rng, (height, width))
    np.copyto(mix, _glands(rng, (height, width)), where=tumour)
    np.copyto(mix, _disordered(rng, (height, width)), where=disordered)
    pink = PINK * rng.uniform(0.93, 1.05, 3)
    purple = PURPLE * rng.uniform(0.9, 1.1, 3)
    rgb = np.empty((height, width, 3), np.uint8)
    for r0, r1 in _row_bands(height, width):  # the colour's float64 temporaries, a band at a time
        m = mix[r0:r1, :, None]
        band = np.where(tissue[r0:r1, :, None], pink * (1 - m) + purple * m, BACKGROUND)
        rgb[r0:r1] = np.clip(np.rint(band + rng.normal(0, 3.0, (r1 - r0, width, 3))), 0, 255)
    return rgb, {"tissue": tissue, "tumour": tumour, "disordered": disordered}


def write_pyramid_tiff(path: Path, rgb: np.ndarray, mpp: float) -> None:
    """Write `rgb` as a tiled, JPEG-compressed TIFF with reduced levels at DOWNSAMPLES (temp name, then rename)."""
    import tifffile

    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp) as tif:
        for d in DOWNSAMPLES:
            level = rgb if d == 1 else _downsample(rgb, d)
            tif.write(level, photometric="rgb", tile=(256, 256), compression="jpeg", compressionargs={"level": 92},
                      subfiletype=0 if d == 1 else 1, resolution=(1e4 / (mpp * d),) * 2,
                      resolutionunit="CENTIMETER")
    os.replace(tmp, path)


def image_id(seed: int, index: int) -> str:
    """A PANDA-style 32-hex image id for slide `index` of the set made with `seed`."""
    return hashlib.md5(f"bigjax-synthetic-{seed}-{index}".encode()).hexdigest()


def _write_one(job) -> dict:
    out, seed, index, grade, side, mpp, region_scale = job
    rng = np.random.default_rng([seed, 1, index])
    height, width = (int(rng.integers(side[0], side[1] + 1)) for _ in range(2))
    rgb, masks = render_slide(rng, grade, height, width, region_scale)
    slide_id = image_id(seed, index)
    write_pyramid_tiff(out / "train_images" / f"{slide_id}.tiff", rgb, mpp)
    write_mask_tiff(out / "train_label_masks" / f"{slide_id}_mask.tiff", radboud_labels(masks, grade), mpp)
    return {"image_id": slide_id, "data_provider": PROVIDER, "isup_grade": grade, "gleason_score": GLEASON[grade]}


def radboud_labels(masks: dict, grade: int) -> np.ndarray:
    """uint8 (h, w) Radboud labels of `render_slide`'s masks: 0 background, 1 stroma, 3 gland-like,
    4 disordered (5 on a grade-5 slide)."""
    labels = np.where(masks["tissue"], STROMA, 0).astype(np.uint8)
    labels[masks["tumour"]] = GLAND_LIKE
    labels[masks["disordered"]] = 5 if grade == GRADES - 1 else DISORDERED
    return labels


def write_mask_tiff(path: Path, labels: np.ndarray, mpp: float) -> None:
    """Write labels (h, w) as PANDA writes its masks: RGB, the label in red, the image's levels
    (nearest, not averaged: a label is a class), deflate-compressed 256 px tiles (temp name, then rename)."""
    import tifffile

    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp) as tif:
        for d in DOWNSAMPLES:
            h, w = labels.shape[0] // d, labels.shape[1] // d
            level = labels[d // 2::d, d // 2::d][:h, :w]
            rgb = np.zeros((h, w, 3), np.uint8)
            rgb[..., 0] = level
            tif.write(rgb, photometric="rgb", tile=(256, 256), compression="zlib",
                      subfiletype=0 if d == 1 else 1, resolution=(1e4 / (mpp * d),) * 2,
                      resolutionunit="CENTIMETER")
    os.replace(tmp, path)


def make_planted(out_dir: str | os.PathLike, box: tuple[int, int, int, int], *, shape=(256, 256),
                 seed: int = 0, mpp: float = 0.5) -> Path:
    """One PANDA-layout slide of tissue everywhere with a single disordered tumour rectangle
    `box` = (y0, x0, y1, x1) in level-0 pixels, its mask and a one-row train.csv (grade 4): where the
    tumour is, exactly, for heatmap tests.

    Returns:
      `out_dir` as a Path; the slide's id is `image_id(seed, 0)`.
    """
    out = Path(out_dir)
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    (out / "train_label_masks").mkdir(exist_ok=True)
    rng = np.random.default_rng([seed, 2])
    tumour = np.zeros(shape, bool)
    tumour[box[0]:box[2], box[1]:box[3]] = True
    mix = np.where(tumour, _disordered(rng, shape), _stroma(rng, shape))
    rgb = PINK * (1 - mix[..., None]) + PURPLE * mix[..., None] + rng.normal(0, 3.0, (*shape, 3))
    slide_id = image_id(seed, 0)
    write_pyramid_tiff(out / "train_images" / f"{slide_id}.tiff", np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mpp)
    masks = {"tissue": np.ones(shape, bool), "tumour": tumour, "disordered": tumour}
    write_mask_tiff(out / "train_label_masks" / f"{slide_id}_mask.tiff", radboud_labels(masks, 4), mpp)
    (out / "train.csv").write_text("image_id,data_provider,isup_grade,gleason_score\n"
                                   f"{slide_id},{PROVIDER},4,{GLEASON[4]}\n")
    return out


def _jitter(rng, share: float) -> float:
    return 0.0 if share == 0 else float(np.clip(share + rng.uniform(-0.05, 0.05), 0.0, 1.0))


def _smooth_field(rng, shape, scale: float) -> np.ndarray:
    """Low-frequency noise with features about `scale` pixels across, at full resolution."""
    small = (max(2, shape[0] // int(scale) + 2), max(2, shape[1] // int(scale) + 2))
    coarse = ndimage.gaussian_filter(rng.normal(size=small), 0.8)
    zoom = (shape[0] / small[0], shape[1] / small[1])
    return ndimage.zoom(coarse, zoom, order=3, grid_mode=True, mode="nearest")[: shape[0], : shape[1]]


def _blobs(rng, shape, scale: float, share: float, within: np.ndarray | None = None) -> np.ndarray:
    """Smooth blobs covering `share` of the image (or of the `within` mask)."""
    field = _smooth_field(rng, shape, scale)
    if share <= 0:
        return np.zeros(shape, bool)
    values = field[within] if within is not None else field.ravel()
    if values.size == 0:
        return np.zeros(shape, bool)
    return field >= np.quantile(values, 1 - share)


def _balanced(field: np.ndarray, std: float) -> np.ndarray:
    """Rescale a texture to mean MIX_MEAN and the given contrast, in [0, 1]."""
    mix = np.clip(MIX_MEAN + (field - field.mean()) / (field.std() + 1e-9) * std, 0, 1)
    return np.clip(mix - mix.mean() + MIX_MEAN, 0, 1)


def _stroma(rng, shape) -> np.ndarray:
    """Benign stroma: smooth streaks elongated along a random direction, low contrast."""
    sigma = (1.5, 6.0) if rng.integers(2) else (6.0, 1.5)
    return _balanced(ndimage.gaussian_filter(rng.normal(size=shape), sigma), 0.08)


def _glands(rng, shape) -> np.ndarray:
    """Gland-like texture: a jittered lattice of pale lumens ringed by dark nuclei, period 12-16 px."""
    period = rng.uniform(12, 16)
    cells = tuple(int((n - 1) // period) + 1 for n in shape)
    jitter = rng.uniform(-0.15, 0.15, (*cells, 2)) * period
    ring = np.empty(shape)
    for r0, r1 in _row_bands(*shape):
        yy, xx = np.meshgrid(np.arange(r0, r1), np.arange(shape[1]), indexing="ij")
        cy, cx = (yy // period).astype(int), (xx // period).astype(int)
        dy = yy - (cy + 0.5) * period - jitter[cy, cx, 0]
        dx = xx - (cx + 0.5) * period - jitter[cy, cx, 1]
        r = np.hypot(dy, dx) / period
        ring[r0:r1] = np.exp(-(((r - 0.32) / 0.07) ** 2)) - 0.6 * (r < 0.22)
    return _balanced(ring + 0.1 * rng.normal(size=shape), 0.28)


def _disordered(rng, shape) -> np.ndarray:
    """Disordered tumour: dense, randomly scattered nuclei without structure, about 3 px across."""
    dots = (rng.random(shape) < 0.035).astype(np.float64)
    return _balanced(ndimage.gaussian_filter(dots, 1.2), 0.28)


def _row_bands(height: int, width: int, values: int = 2**24):
    """Row ranges of about ``values`` pixels: what the full-resolution renderers hold per band, so
    a 16,384² slide renders within a few GB of float64 temporaries, with the same pixels."""
    rows = max(1, values // width)
    return [(r0, min(height, r0 + rows)) for r0 in range(0, height, rows)]


def _downsample(rgb: np.ndarray, d: int) -> np.ndarray:
    """Box-filter `rgb` by `d` (the edge rows/cols that do not fill a box are dropped)."""
    h, w = rgb.shape[0] // d, rgb.shape[1] // d
    boxes = rgb[: h * d, : w * d].reshape(h, d, w, d, 3).astype(np.float32)
    return np.rint(boxes.mean(axis=(1, 3))).astype(np.uint8)
