"""Tile stores: each slide's tiles in a tensorstore zarr v3 array, one tile per chunk, sharded.

Layout of a store folder:

    <root>/manifest.csv                 one row per slide (see `bigjax.data.manifest`)
    <root>/slides/<slide_id>/meta.json  slide id, label, source file, level, µm/px, tile size, n_tiles
    <root>/slides/<slide_id>/tiles/     zarr v3 uint8 (n_tiles, T, T, 3); chunk = 1 tile,
                                        shard = SHARD_TILES tiles, so a slide is a handful of files
    <root>/slides/<slide_id>/coords/    zarr v3 int64 (n_tiles, 2): (y, x) of each tile in level-0 pixels

`SlideWriter` fills one slide folder; `TileStore` reads random subsets of tiles through
tensorstore futures, so many tiles (and many slides) are read concurrently.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorstore as ts

from bigjax.data.manifest import ManifestRow, read_manifest, select

SHARD_TILES = 64
COMPRESSIONS = ("raw", "zstd")


def tiles_spec(path: Path, n_tiles: int, tile_size: int, shard_tiles: int = SHARD_TILES,
               compression: str = "raw") -> dict:
    """tensorstore spec that creates a zarr v3 tile array: chunk = one tile, shard = `shard_tiles` tiles."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r}: expected one of {COMPRESSIONS}")
    inner = [{"name": "bytes"}]
    if compression == "zstd":
        inner.append({"name": "zstd", "configuration": {"level": 1}})
    tile = [1, tile_size, tile_size, 3]
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": [n_tiles, tile_size, tile_size, 3],
            "data_type": "uint8",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_tiles, tile_size, tile_size, 3]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {"chunk_shape": tile, "codecs": inner}}],
        },
        "create": True,
        "delete_existing": True,
    }


class SlideWriter:
    """Write one slide's tiles to `folder` (tiles/, coords/, meta.json), a shard at a time.

    Args:
      folder: the slide folder to create (normally a temporary name, renamed when done).
      tile_size: T, tiles are uint8 (T, T, 3).
      capacity: an upper bound on the number of tiles (e.g. the tile grid size).
      shard_tiles: tiles per shard file.
      compression: "raw" (fastest reads) or "zstd" (level 1).
    """

    def __init__(self, folder: Path, tile_size: int, capacity: int, shard_tiles: int = SHARD_TILES,
                 compression: str = "raw"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tile_size, self.shard_tiles = tile_size, shard_tiles
        spec = tiles_spec(self.folder / "tiles", capacity, tile_size, shard_tiles, compression)
        self._tiles = ts.open(spec).result()
        self._buffer: list[np.ndarray] = []
        self._coords: list[np.ndarray] = []
        self.n_tiles = 0

    def append(self, tiles: np.ndarray, coords: np.ndarray) -> None:
        """Add uint8 (n, T, T, 3) tiles and their int (n, 2) coordinates; full shards are written now."""
        self._buffer.append(tiles)
        self._coords.append(coords)
        if sum(len(b) for b in self._buffer) >= self.shard_tiles:
            self._flush(whole_shards=True)

    def finish(self, meta: dict) -> int:
        """Write what is buffered, shrink the array to the tiles written, write coords and meta.json.

        Returns:
          the number of tiles written.
        """
        self._flush(whole_shards=False)
        t = self.tile_size
        self._tiles.resize(exclusive_max=[self.n_tiles, t, t, 3], shrink_only=True).result()
        coords = np.concatenate(self._coords) if self._coords else np.zeros((0, 2), np.int64)
        coords_spec = {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(self.folder / "coords")},
            "metadata": {"shape": [len(coords), 2], "data_type": "int64",
                         "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(len(coords), 1), 2]}}},
            "create": True,
            "delete_existing": True,
        }
        ts.open(coords_spec).result().write(coords.astype(np.int64)).result()
        meta = {**meta, "n_tiles": self.n_tiles, "tile_size": t}
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=1))
        return self.n_tiles

    def _flush(self, whole_shards: bool) -> None:
        if not self._buffer:
            return
        tiles = np.concatenate(self._buffer)
        n_write = (len(tiles) // self.shard_tiles) * self.shard_tiles if whole_shards else len(tiles)
        if n_write:
            self._tiles[self.n_tiles:self.n_tiles + n_write].write(tiles[:n_write]).result()
            self.n_tiles += n_write
        self._buffer = [tiles[n_write:]] if n_write < len(tiles) else []


class TileStore:
    """Read tiles of a store folder written by `bigjax.data.tiling.tile_dataset`.

    Args:
      root: the store folder (holds slides/ and usually manifest.csv).
      cache_bytes: tensorstore cache (keeps shard indexes; tile data mostly comes from the page cache).
    """

    def __init__(self, root: str | Path, cache_bytes: int = 64 << 20):
        self.root = Path(root)
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes},
                                    "file_io_concurrency": {"limit": 32}})
        self._arrays: dict[str, ts.TensorStore] = {}
        self._meta: dict[str, dict] = {}

    def slides(self, split: str | None = None) -> list[ManifestRow]:
        """Manifest rows of the slides with tiles, of `split` when given (see `manifest.select`)."""
        return select(read_manifest(self.root / "manifest.csv"), split)

    def folder(self, slide_id: str) -> Path:
        """The slide's folder in the store."""
        return self.root / "slides" / slide_id

    def meta(self, slide_id: str) -> dict:
        """The slide's meta.json: slide_id, label, source, level, mpp, tile_size, n_tiles, ..."""
        if slide_id not in self._meta:
            path = self.folder(slide_id) / "meta.json"
            if not path.is_file():
                raise KeyError(f"store {self.root}: no tiled slide {slide_id!r} ({path} missing)")
            self._meta[slide_id] = json.loads(path.read_text())
        return self._meta[slide_id]

    def num_tiles(self, slide_id: str) -> int:
        """Number of tiles stored for the slide (0 for a slide without tissue)."""
        return int(self.meta(slide_id)["n_tiles"])

    def coords(self, slide_id: str) -> np.ndarray:
        """int64 (n_tiles, 2): (y, x) of each tile's top-left corner in level-0 pixels."""
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.folder(slide_id) / "coords")}}
        return ts.open(spec, context=self._context).result().read().result()

    def read_async(self, slide_id: str, indices) -> "PendingTiles":
        """Start reading tiles `indices` (any order, repeats allowed); `.result()` is uint8 (K, T, T, 3)."""
        indices = np.asarray(indices, np.int64)
        n = self.num_tiles(slide_id)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise IndexError(f"slide {slide_id}: tile index out of range [0, {n}) in {indices.min()}..{indices.max()}")
        if indices.size and np.all(np.diff(indices) > 0):
            return PendingTiles(self._array(slide_id)[indices].read(), None)
        # tensorstore reads repeated or unsorted index arrays tile by tile (~50x slower): read each tile once
        unique, inverse = np.unique(indices, return_inverse=True)
        return PendingTiles(self._array(slide_id)[unique].read(), inverse)

    def read(self, slide_id: str, indices) -> np.ndarray:
        """Tiles `indices` of the slide as uint8 (K, T, T, 3)."""
        return self.read_async(slide_id, indices).result()

    def _array(self, slide_id: str) -> ts.TensorStore:
        if slide_id not in self._arrays:
            if self.num_tiles(slide_id) == 0:
                raise ValueError(f"slide {slide_id}: no tissue tiles in store {self.root}")
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.folder(slide_id) / "tiles")}}
            self._arrays[slide_id] = ts.open(spec, context=self._context, read=True).result()
        return self._arrays[slide_id]


class PendingTiles:
    """A tile read in flight (tensorstore future); `result()` waits and returns uint8 (K, T, T, 3)."""

    def __init__(self, future: ts.Future, inverse: np.ndarray | None):
        self._future, self._inverse = future, inverse

    def result(self) -> np.ndarray:
        tiles = self._future.result()
        return tiles if self._inverse is None else tiles[self._inverse]
