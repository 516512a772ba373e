"""tile_dataset: store round-trip, bad and empty slides, resuming, parallel workers."""
import dataclasses
import shutil

import numpy as np
import pytest
import tifffile

from bigjax.data.layouts import SlideEntry, panda_layout
from bigjax.data.manifest import read_manifest
from bigjax.data.store import TileStore
from bigjax.data.synthetic import write_pyramid_tiff
from bigjax.data.tiling import TilingConfig, check_tiling, stored_tiling, tile_dataset

from .conftest import TILE


def test_store_round_trip_is_exact(panda_dir, store_dir):
    store = TileStore(store_dir)
    rows = read_manifest(store_dir / "manifest.csv")
    assert len(rows) == 6 and all(r.status == "ok" for r in rows)
    for row in rows:
        rgb = tifffile.imread(row.source)
        coords = store.coords(row.slide_id)
        tiles = store.read(row.slide_id, np.arange(row.n_tiles))
        assert tiles.shape == (row.n_tiles, TILE, TILE, 3) and len(coords) == row.n_tiles
        for tile, (y, x) in zip(tiles, coords):
            np.testing.assert_array_equal(tile, rgb[y:y + TILE, x:x + TILE])


def test_random_subset_with_repeats(store_dir):
    store = TileStore(store_dir)
    row = read_manifest(store_dir / "manifest.csv")[0]
    everything = store.read(row.slide_id, np.arange(row.n_tiles))
    indices = np.array([5, 0, 5, row.n_tiles - 1, 2])
    np.testing.assert_array_equal(store.read(row.slide_id, indices), everything[indices])
    with pytest.raises(IndexError, match=row.slide_id):
        store.read(row.slide_id, [row.n_tiles])


def test_bad_and_empty_slides_are_recorded(panda_dir, tmp_path):
    good = panda_layout(panda_dir)[0]
    cut = tmp_path / "cut.tiff"
    data = good.path.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    white = tmp_path / "white.tiff"
    write_pyramid_tiff(white, np.full((128, 128, 3), 248, np.uint8), mpp=0.5)
    slides = [good, SlideEntry("cut", cut, 1, "train"), SlideEntry("gone", tmp_path / "gone.tiff", 2, "val"),
              SlideEntry("white", white, 0, "test")]
    store = tmp_path / "store"
    rows = {r.slide_id: r for r in read_manifest(tile_dataset(slides, store, TilingConfig(tile_size=TILE),
                                                              progress=False))}
    assert [rows[s.slide_id].status for s in slides] == ["ok", "failed", "failed", "empty"]
    assert "cut.tiff" in rows["cut"].error and "truncated" in rows["cut"].error
    assert "gone.tiff" in rows["gone"].error
    assert rows["white"].n_tiles == 0 and TileStore(store).num_tiles("white") == 0
    assert sorted(p.name for p in (store / "slides").iterdir()) == sorted([good.slide_id, "white"])


def test_resume_skips_finished_and_cleans_a_crashed_slide(panda_dir, tmp_path):
    slides = panda_layout(panda_dir)[:3]
    store = tmp_path / "store"
    config = TilingConfig(tile_size=TILE)
    first = read_manifest(tile_dataset(slides, store, config, progress=False))
    done = store / "slides" / slides[0].slide_id / "meta.json"
    stamp = done.stat().st_mtime_ns
    # a crash mid-slide leaves only a temp folder; the finished folder of slide 1 is gone
    shutil.rmtree(store / "slides" / slides[1].slide_id)
    (store / "slides" / f".{slides[1].slide_id}.tmp" / "tiles").mkdir(parents=True)
    second = read_manifest(tile_dataset(slides, store, config, progress=False))
    assert second == first
    assert done.stat().st_mtime_ns == stamp
    assert not list((store / "slides").glob(".*.tmp"))
    with pytest.raises(ValueError, match="tile_size=32"):
        tile_dataset(slides, store, dataclasses.replace(config, tile_size=64), progress=False)


def test_parallel_workers_match_serial(panda_dir, store_dir, tmp_path):
    slides = panda_layout(panda_dir, seed=0)
    rows = read_manifest(tile_dataset(slides, tmp_path, TilingConfig(tile_size=TILE), workers=2, progress=False))
    assert rows == read_manifest(store_dir / "manifest.csv")
    a, b = TileStore(tmp_path), TileStore(store_dir)
    for row in rows:
        everything = np.arange(row.n_tiles)
        np.testing.assert_array_equal(a.read(row.slide_id, everything), b.read(row.slide_id, everything))


def test_zstd_store_reads_the_same(panda_dir, store_dir, tmp_path):
    slides = panda_layout(panda_dir, seed=0)[:2]
    tile_dataset(slides, tmp_path, TilingConfig(tile_size=TILE, compression="zstd"), progress=False)
    for s in slides:
        n = TileStore(store_dir).num_tiles(s.slide_id)
        np.testing.assert_array_equal(TileStore(tmp_path).read(s.slide_id, np.arange(n)),
                                      TileStore(store_dir).read(s.slide_id, np.arange(n)))


def test_tiles_at_a_lower_magnification(panda_dir, tmp_path):
    slide = panda_layout(panda_dir)[0]
    tile_dataset([slide], tmp_path, TilingConfig(tile_size=16, mpp=2.0), progress=False)
    store = TileStore(tmp_path)
    (row,) = store.slides()
    assert store.meta(row.slide_id)["level"] == 1
    level1 = tifffile.imread(slide.path, level=1)
    tiles, coords = store.read(row.slide_id, np.arange(row.n_tiles)), store.coords(row.slide_id)
    assert (coords % 64 == 0).all()  # level-0 pixels: 16 px tiles at downsample 4
    for tile, (y, x) in zip(tiles, coords // 4):
        np.testing.assert_array_equal(tile, level1[y:y + 16, x:x + 16])


def test_tiling_settings_recorded_and_a_mismatch_refused(store_dir, tmp_path):
    assert stored_tiling(store_dir) == {"tile_size": TILE, "rule": "panda", "mpp": None, "base_mpp": None}
    check_tiling(store_dir, tile_size=TILE, rule="panda")
    with pytest.raises(ValueError, match=rf"store {store_dir} was tiled with tile_size={TILE}; asked tile_size=64: "
                                         r"use those settings or a new store folder"):
        check_tiling(store_dir, tile_size=64)
    with pytest.raises(ValueError, match=r"tiled with tile_size=32, rule=panda; asked tile_size=64, rule=camelyon"):
        check_tiling(store_dir, tile_size=64, rule="camelyon")
    with pytest.raises(ValueError, match=r"unknown settings \['tilesize'\]"):
        check_tiling(store_dir, tilesize=64)
    old = tmp_path / "old"  # a store from before tiling.json: the settings come from a slide's meta.json
    shutil.copytree(store_dir, old)
    (old / "tiling.json").unlink()
    assert stored_tiling(old) == {"tile_size": TILE, "rule": "panda", "mpp": None}
    with pytest.raises(ValueError, match="tile_size=32; asked tile_size=64"):
        check_tiling(old, tile_size=64)
    assert stored_tiling(tmp_path / "new") is None
    check_tiling(tmp_path / "new", tile_size=64)


def test_repeated_slide_ids_are_named(panda_dir, tmp_path):
    slides = panda_layout(panda_dir)[:2]
    with pytest.raises(ValueError, match=rf"slide ids are not unique; repeated: '{slides[1].slide_id}'$"):
        tile_dataset([*slides, slides[1]], tmp_path, TilingConfig(tile_size=TILE), progress=False)
