"""Tile a data set into a tile store: parallel over slides, resumable, crash-safe.

`tile_dataset(slides, store_dir, ...)` reads each slide (`bigjax.data.slides`), keeps the tiles
that pass the foreground rule and writes them with `SlideWriter` into `slides/.<id>.tmp`, renamed
to `slides/<id>` only when complete, so a crash mid-slide loses nothing already written. A slide
whose folder exists is skipped on the next run. Missing, truncated or unreadable slides are logged
with their path and listed as "failed" (and retried on the next run); slides without tissue are
listed as "empty". One tiler at a time per store (`<store>/tiling.lock`, `bigjax.lock`).
The settings that define the tiles (tile size, rule, µm per pixel) are recorded in
`<store>/tiling.json`; tiling or training with other settings on the same store is refused
(`check_tiling`).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bigjax.data.layouts import SlideEntry
from bigjax.data.manifest import ManifestRow, write_manifest
from bigjax.data.slides import RULES, SlideReadError, foreground_tiles, open_slide, pick_level, tile_grid
from bigjax.data.store import SHARD_TILES, SlideWriter
from bigjax import lock

log = logging.getLogger(__name__)

TILING_FILE = "tiling.json"
TILING_SETTINGS = ("tile_size", "rule", "mpp", "base_mpp")


@dataclasses.dataclass(frozen=True)
class TilingConfig:
    """How slides are tiled.

    Attributes:
      tile_size: tile side in pixels at the chosen level.
      rule: foreground rule, "panda" or "camelyon".
      mpp: µm per pixel to tile at (the closest pyramid level is used); None = level 0.
      base_mpp: µm per pixel of level 0 for slides that do not record it.
      shard_tiles: tiles per shard file.
      compression: "raw" or "zstd".
    """

    tile_size: int = 256
    rule: str = "panda"
    mpp: float | None = None
    base_mpp: float | None = None
    shard_tiles: int = SHARD_TILES
    compression: str = "raw"


def tile_dataset(slides: Sequence[SlideEntry], store_dir: str | os.PathLike, config: TilingConfig = TilingConfig(),
                 *, workers: int = 1, progress: bool = True) -> Path:
    """Tile every slide into the store at `store_dir` and write its manifest.csv.

    Args:
      slides: from a layout (`bigjax.data.layouts`).
      store_dir: the store folder; created if missing, resumed if it holds finished slides.
      config: tile size, foreground rule, magnification, storage.
      workers: processes tiling slides in parallel (1 = in this process).
      progress: show a tqdm bar of slides done.

    Returns:
      path of the manifest CSV.
    """
    if config.rule not in RULES:
        raise ValueError(f"foreground rule {config.rule!r}: expected one of {RULES}")
    ids = [s.slide_id for s in slides]
    repeated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    if repeated:
        raise ValueError(f"slide ids are not unique; repeated: {', '.join(map(repr, repeated[:5]))}"
                         f"{' ...' if len(repeated) > 5 else ''}")
    root = Path(store_dir)
    asked = defining_settings(config)
    check_tiling(root, **asked)
    with lock.hold(root / lock.TILING_LOCK, "a tiler"):  # one tiler per store
        return _tile_into(slides, root, config, asked, workers, progress)


def _tile_into(slides: Sequence[SlideEntry], root: Path, config: TilingConfig, asked: dict, workers: int,
               progress: bool) -> Path:
    """``tile_dataset``'s work, the store's lock held: the slides not yet tiled, then the manifest."""
    ids = [s.slide_id for s in slides]
    (root / "slides").mkdir(parents=True, exist_ok=True)
    (root / TILING_FILE).write_text(json.dumps(asked, indent=1))
    rows = {s.slide_id: row for s in slides if (row := finished_row(root, s, config)) is not None}
    todo = [s for s in slides if s.slide_id not in rows]
    with logging_redirect_tqdm(), tqdm(total=len(slides), initial=len(rows), desc="tiling slides", unit="slide",
                                       disable=not progress) as bar:
        for row in _run(todo, root, config, workers):
            if row.status == "failed":
                log.error("tiling failed: %s", row.error)
            rows[row.slide_id] = row
            bar.update()
    return write_manifest(root / "manifest.csv", [rows[i] for i in ids])


def defining_settings(config: TilingConfig) -> dict:
    """The settings that define a store's tiles (not how they are stored)."""
    return {"tile_size": config.tile_size, "rule": config.rule, "mpp": config.mpp, "base_mpp": config.base_mpp}


def stored_tiling(store_dir: str | os.PathLike) -> dict | None:
    """The defining settings a store was tiled with (`tiling.json`; for older stores, read from a slide's
    meta.json, without base_mpp), or None for a store with no slide yet."""
    root = Path(store_dir)
    if (root / TILING_FILE).is_file():
        return json.loads((root / TILING_FILE).read_text())
    for meta_path in sorted((root / "slides").glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        return {"tile_size": meta["tile_size"], "rule": meta["rule"], "mpp": meta["mpp_requested"]}
    return None


def check_tiling(store_dir: str | os.PathLike, **asked) -> None:
    """Refuse settings that differ from those the store was tiled with (e.g. ``check_tiling(store, tile_size=64)``).

    Raises:
      ValueError: naming each setting, the store's value and the value asked.
    """
    stored = stored_tiling(store_dir)
    if stored is None:
        return
    unknown = set(asked) - set(TILING_SETTINGS)
    if unknown:
        raise ValueError(f"check_tiling: unknown settings {sorted(unknown)}; expected some of {TILING_SETTINGS}")
    differ = [k for k, v in asked.items() if k in stored and stored[k] != v]
    if differ:
        raise ValueError(f"store {store_dir} was tiled with " + ", ".join(f"{k}={stored[k]}" for k in differ)
                         + "; asked " + ", ".join(f"{k}={asked[k]}" for k in differ)
                         + ": use those settings or a new store folder")


def tile_slide(entry: SlideEntry, root: Path, config: TilingConfig) -> ManifestRow:
    """Tile one slide into `root/slides/<id>`; never raises for a bad slide, returns a "failed" row instead."""
    final = root / "slides" / entry.slide_id
    tmp = root / "slides" / f".{entry.slide_id}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        n_tiles = _write_slide(entry, tmp, config)
    except Exception as err:  # a bad slide must not stop the data set: record it and go on
        shutil.rmtree(tmp, ignore_errors=True)
        message = str(err) if isinstance(err, SlideReadError) else f"slide {entry.path}: {type(err).__name__}: {err}"
        return _row(entry, root, 0, "failed", message)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return _row(entry, root, n_tiles, "ok" if n_tiles else "empty")


def finished_row(root: Path, entry: SlideEntry, config: TilingConfig) -> ManifestRow | None:
    """The manifest row of a slide already tiled in `root`, or None if it still has to be tiled."""
    meta_path = root / "slides" / entry.slide_id / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    asked = {"tile_size": config.tile_size, "rule": config.rule, "mpp_requested": config.mpp}
    for key, value in asked.items():
        if meta.get(key) != value:
            raise ValueError(f"store {root}: slide {entry.slide_id} was tiled with {key}={meta.get(key)}, "
                             f"now asked {value}; use a new store folder")
    n_tiles = int(meta["n_tiles"])
    return _row(entry, root, n_tiles, "ok" if n_tiles else "empty")


def _write_slide(entry: SlideEntry, folder: Path, config: TilingConfig) -> int:
    with open_slide(entry.path, config.base_mpp) as slide:
        level = pick_level(slide.levels, config.mpp)
        info = slide.levels[level]
        rows, cols = tile_grid(info, config.tile_size)
        writer = SlideWriter(folder, config.tile_size, rows * cols, config.shard_tiles, config.compression)
        for tiles, coords in foreground_tiles(slide, level, config.tile_size, config.rule):
            writer.append(tiles, np.rint(coords * info.downsample).astype(np.int64))
        meta = {"slide_id": entry.slide_id, "label": entry.label, "source": str(entry.path), "level": level,
                "downsample": info.downsample, "mpp": info.mpp, "mpp_requested": config.mpp, "rule": config.rule,
                "level_shape": list(info.shape)}
        return writer.finish(meta)


def _row(entry: SlideEntry, root: Path, n_tiles: int, status: str, error: str = "") -> ManifestRow:
    store = f"slides/{entry.slide_id}" if status != "failed" else ""
    return ManifestRow(entry.slide_id, entry.label, entry.split, n_tiles, status, store, str(entry.path), error)


def _run(todo: Sequence[SlideEntry], root: Path, config: TilingConfig, workers: int):
    """Yield manifest rows as slides finish, in this process or in a spawned process pool."""
    if workers <= 1 or len(todo) <= 1:
        for entry in todo:
            yield tile_slide(entry, root, config)
        return
    # spawn, not fork: the parent may hold JAX or tensorstore threads
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(tile_slide, entry, root, config) for entry in todo]
        for future in as_completed(futures):
            yield future.result()
