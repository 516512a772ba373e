"""Heatmaps: the hottest tiles are drawn where a planted tumour is; ranks, blur, strip."""
import io

import matplotlib
import numpy as np
from PIL import Image

from bigjax.data.masks import mask_path, tile_tumour_fraction
from bigjax.data.synthetic import image_id, make_planted
from bigjax.train.heatmap import HEADER, STRIP_TILE, draw, rank_normalise, score_canvas

BOX = (64, 96, 128, 192)  # (y0, x0, y1, x1): 2 x 3 tiles of 32 px


def _planted(tmp_path):
    out = make_planted(tmp_path, BOX, shape=(256, 256))
    slide = out / "train_images" / f"{image_id(0, 0)}.tiff"
    coords = np.array([(y, x) for y in range(0, 256, 32) for x in range(0, 256, 32)])
    return slide, coords, tile_tumour_fraction(mask_path(slide, image_id(0, 0)), coords, 32)


def _heat(pixels: np.ndarray, cmap="jet") -> np.ndarray:
    """Each pixel's value in 0..1 read back through the colour map (nearest of 256 colours)."""
    lut = matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255
    distance = ((pixels[..., None, :].astype(np.float64) - lut) ** 2).sum(-1)
    return distance.argmin(-1) / 255


def test_hottest_tiles_are_where_the_tumour_is(tmp_path):
    slide, coords, fraction = _planted(tmp_path)
    assert fraction.sum() == 6
    png = io.BytesIO()
    draw(slide, coords, 32, fraction, side=128, alpha=1.0).save(png, "PNG")
    image = np.asarray(Image.open(png).convert("RGB"))
    heat = _heat(image[HEADER:HEADER + 128, :128])  # the thumbnail: 128 px for 256, 2 level-0 px each
    hot = heat > 0.9
    tumour = np.zeros((128, 128), bool)
    tumour[BOX[0] // 2:BOX[2] // 2, BOX[1] // 2:BOX[3] // 2] = True
    assert hot[tumour].mean() > 0.95 and not hot[~tumour].any()


def test_rank_normalisation_and_canvas():
    np.testing.assert_allclose(rank_normalise([10.0, -1.0, 10.0, 3.0]), [0.875, 0.25, 0.875, 0.5])
    coords = np.array([[0, 0], [0, 32], [32, 32]])
    canvas = score_canvas((8, 8), 8.0, coords, 32, np.array([1.0, 2.0, 3.0]))
    assert canvas[0, 0] == 1 and canvas[0, 7] == 2 and canvas[7, 7] == 3 and np.isnan(canvas[7, 0])
    blurred = score_canvas((8, 8), 8.0, coords, 32, np.array([1.0, 2.0, 3.0]), blur=1.0)
    assert np.isnan(blurred[7, 0]) and 1 < blurred[3, 3] < 3  # smooth within the tissue, none outside


def test_strip_of_top_and_bottom_tiles_and_raw_scores(tmp_path):
    slide, coords, fraction = _planted(tmp_path)
    tiles = np.zeros((len(coords), 32, 32, 3), np.uint8)
    tiles[fraction > 0.5] = 255  # the tumour tiles white: the top strip must show them
    plain = draw(slide, coords, 32, fraction, side=128)
    page = draw(slide, coords, 32, fraction, tiles=tiles, side=128, top_k=3, raw=True, blur=0.5)
    assert page.height > plain.height
    strip, t = np.asarray(page)[plain.height + 16:], STRIP_TILE
    for i in range(3):  # top tiles (white) first, then a 32 px gap, then the bottom tiles (black)
        assert strip[:t, i * (t + 4):i * (t + 4) + t].min() == 255
        assert strip[:t, 3 * (t + 4) + 32 + i * (t + 4):][:, :t].max() == 0
