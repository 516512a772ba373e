"""The generated PANDA-like set: layout, determinism, and grade written in texture, not colour."""
import csv
import time

import numpy as np
import pytest
import tifffile

from bigjax.data.layouts import panda_layout
from bigjax.data.manifest import read_manifest
from bigjax.data.slides import greyscale
from bigjax.data.store import TileStore
from bigjax.data.synthetic import make_panda_like, render_slide
from bigjax.data.tiling import TilingConfig, tile_dataset


def _rows(folder):
    with open(folder / "train.csv", newline="") as f:
        return list(csv.DictReader(f))


def _detail(grey: np.ndarray) -> np.ndarray:
    """Mean absolute Laplacian of each (n, T, T) greyscale tile: fine texture, blind to mean colour."""
    g = grey.astype(np.float32)
    lap = 4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    return np.abs(lap).mean(axis=(1, 2))


def test_panda_layout_files(panda_dir):
    rows = _rows(panda_dir)
    assert list(rows[0]) == ["image_id", "data_provider", "isup_grade", "gleason_score"]
    assert sorted(int(r["isup_grade"]) for r in rows) == [0, 1, 2, 3, 4, 5]
    with tifffile.TiffFile(panda_dir / "train_images" / f"{rows[0]['image_id']}.tiff") as tif:
        levels = tif.series[0].levels
        assert len(levels) == 3 and tif.pages[0].is_tiled
        assert levels[1].shape[0] == levels[0].shape[0] // 4


def test_seeded_and_deterministic(tmp_path):
    a = make_panda_like(tmp_path / "a", n_slides=2, seed=9, side=(128, 160), workers=1)
    b = make_panda_like(tmp_path / "b", n_slides=2, seed=9, side=(128, 160), workers=1)
    c = make_panda_like(tmp_path / "c", n_slides=2, seed=10, side=(128, 160), workers=1)
    assert _rows(a) == _rows(b) and _rows(a) != _rows(c)
    for row in _rows(a):
        name = f"train_images/{row['image_id']}.tiff"
        np.testing.assert_array_equal(tifffile.imread(a / name), tifffile.imread(b / name))


def test_tumour_share_grows_with_grade_at_equal_mean_colour():
    shares = []
    for grade in range(6):
        rgb, masks = render_slide(np.random.default_rng([1, grade]), grade, 384, 384)
        tissue, tumour = masks["tissue"], masks["tumour"]
        shares.append(tumour.sum() / tissue.sum())
        if grade:
            stroma = tissue & ~tumour
            assert np.abs(rgb[tumour].mean(0) - rgb[stroma].mean(0)).max() < 3.0
    assert shares[0] == 0 and np.all(np.diff(shares) > 0.05)


def test_texture_visible_in_32px_tiles():
    rgb, masks = render_slide(np.random.default_rng(4), 3, 512, 512)
    t = 32
    grid = lambda a: a[:512, :512].reshape(16, t, 16, t, *a.shape[2:]).swapaxes(1, 2).reshape(256, t, t, *a.shape[2:])
    tiles, tumour, tissue = grid(rgb), grid(masks["tumour"]), grid(masks["tissue"])
    pure_tumour = tumour.all(axis=(1, 2))
    pure_stroma = tissue.all(axis=(1, 2)) & ~tumour.any(axis=(1, 2))
    assert pure_tumour.sum() >= 5 and pure_stroma.sum() >= 5
    detail = _detail(greyscale(tiles))
    assert detail[pure_tumour].min() > 1.5 * detail[pure_stroma].max()


def test_region_scale_enlarges_regions_and_keeps_their_shares():
    def slide(scale):
        return render_slide(np.random.default_rng(5), 4, 768, 768, region_scale=scale)[1]

    def boundary(mask):  # pixels whose right-hand neighbour is on the other side: ~ 1 / region size
        return (mask[:, 1:] != mask[:, :-1]).sum()
    fine, coarse = slide(1), slide(8)
    for region in ("tissue", "tumour"):
        assert boundary(coarse[region]) < boundary(fine[region]) / 2, region
    for masks in (fine, coarse):
        share = masks["tumour"].sum() / masks["tissue"].sum()
        assert abs(share - 0.65) < 0.06, share  # TUMOUR_SHARE[4] jittered by at most 0.05
    with pytest.raises(ValueError, match="region_scale=0: must be positive"):
        make_panda_like("unused", n_slides=1, region_scale=0)


@pytest.mark.slow
def test_default_set_builds_fast_and_colour_does_not_predict_grade(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    start = time.perf_counter()
    data = make_panda_like(tmp_path / "panda")
    assert time.perf_counter() - start < 180  # ~20 s on an idle 2-core machine
    manifest = tile_dataset(panda_layout(data), tmp_path / "store", TilingConfig(tile_size=32), workers=2,
                            progress=False)
    store, rows = TileStore(tmp_path / "store"), read_manifest(manifest)
    colour, texture, grades = [], [], []
    for row in rows:
        tiles = store.read(row.slide_id, np.arange(row.n_tiles))
        colour.append(tiles.reshape(-1, 3).mean(0))
        texture.append([(_detail(greyscale(tiles)) > 15).mean()])
        grades.append(row.label)
    colour = (np.array(colour) - np.mean(colour, 0)) / np.std(colour, 0)
    model = LogisticRegression(max_iter=2000)
    colour_acc = cross_val_score(model, colour, grades, cv=4).mean()
    texture_acc = cross_val_score(model, np.array(texture) * 10, grades, cv=4).mean()
    assert colour_acc < 0.35 and texture_acc > 0.7, (colour_acc, texture_acc)


def test_a_slide_rendered_in_small_row_bands_has_the_same_pixels(monkeypatch):
    """The renderer holds its float64 temporaries a row band at a time (a 16,384² slide renders
    within a few GB); the bands change no pixel and no mask, whatever their height."""
    from bigjax.data import synthetic

    whole = render_slide(np.random.default_rng([0, 1, 4]), 4, 211, 173, 1.5)
    banded = synthetic._row_bands
    monkeypatch.setattr(synthetic, "_row_bands", lambda h, w: banded(h, w, values=3 * w + 5))
    bands = render_slide(np.random.default_rng([0, 1, 4]), 4, 211, 173, 1.5)
    assert len(banded(211, 173, values=3 * 173 + 5)) == 71
    assert np.array_equal(whole[0], bands[0])
    assert all(np.array_equal(whole[1][k], bands[1][k]) for k in whole[1])
