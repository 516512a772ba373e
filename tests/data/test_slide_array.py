"""A slide as a tensorstore array: the same values as the slide read whole, decoded band by band."""
import numpy as np
import pytest
import tifffile

from bigjax.data import slide_array
from bigjax.data.slide_array import as_array, locate, read_whole, tissue_box
from bigjax.data.slides import open_slide
from bigjax.data.synthetic import write_pyramid_tiff
from bigjax.models.arch import IMAGENET

FLIPS = [(False, False), (True, False), (False, True), (True, True)]
TILE = 48  # TIFF tile side: a band of the array is 48 rows of the slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 301 x 253 flat TIFF, lossless, with tissue in rows 37-270 and columns 11-228 (white around)."""
    rgb = np.full((301, 253, 3), 255, np.uint8)
    rgb[37:271, 11:229] = np.random.default_rng(0).integers(20, 220, (234, 218, 3))
    path = tmp_path_factory.mktemp("slide") / "s.tiff"
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(TILE, TILE), compression="zlib")
    return path, rgb


def independent(rgb, box, pad, flips):
    """The image by hand: the box cut out of the level read whole, padded white, flipped, normalised."""
    top, bottom, left, right = box
    h, w = (-(-(bottom - top) // pad) * pad, -(-(right - left) // pad) * pad)
    out = np.full((h, w, 3), 255, np.uint8)
    out[:bottom - top, :right - left] = rgb[top:bottom, left:right]
    out = out[::-1 if flips[0] else 1, ::-1 if flips[1] else 1]
    mean, std = (np.asarray(v, np.float32) for v in IMAGENET)
    return ((out.astype(np.float32) / 255.0 - mean) / std)[None]


def test_tissue_box_is_the_bounding_box_of_tissue_pixels():
    rgb = np.full((10, 12, 3), 255, np.uint8)
    rgb[2:5, 3:9] = 120
    rgb[7, 4] = 0  # black (greyscale < 3) is not tissue by the PANDA rule
    assert tissue_box(rgb) == (2, 5, 3, 9)
    assert tissue_box(np.full((4, 6, 3), 255, np.uint8)) == (0, 4, 0, 6)  # no tissue: all of it


def test_the_box_found_band_by_band_is_the_box_of_the_level_read_whole(slide):
    path, rgb = slide
    image = locate(path, None, pad=32)
    assert image.box == tissue_box(rgb) == (37, 271, 11, 229)
    assert image.shape == (256, 224) and image.band == TILE and image.level == 0


@pytest.mark.parametrize("flips", FLIPS)
def test_the_array_is_the_slide_cropped_padded_flipped_and_normalised(slide, flips):
    path, rgb = slide
    image = locate(path, None, pad=32)
    want = independent(rgb, image.box, 32, flips)
    array = as_array(image, IMAGENET, flips)
    assert array.shape == (1, 256, 224, 3) and array.dtype.numpy_dtype == np.float32
    np.testing.assert_array_equal(array.read().result(), want)
    np.testing.assert_array_equal(read_whole(image, IMAGENET, flips), want)
    for r0 in range(0, 256, 29):  # bands with halos, as a conv reads them, across chunk edges
        rows = slice(max(0, r0 - 3), min(256, r0 + 32))
        np.testing.assert_array_equal(array[:, rows, 5:200].read().result(), want[:, rows, 5:200])


def test_a_read_decodes_only_the_bands_it_touches_each_once(slide, monkeypatch):
    path, rgb = slide
    image = locate(path, None, pad=32)
    decoded = []
    real = slide_array._pixels
    monkeypatch.setattr(slide_array, "_pixels", lambda im, f, rows, cols: decoded.append(rows) or
                        real(im, f, rows, cols))
    array = as_array(image, IMAGENET)
    array[:, 20:30].read().result()
    assert [(r.start, r.stop) for r in decoded] == [(11, 59)]  # one chunk: the slide's rows 48-95
    for r0 in range(0, 256, 16):  # every band of a pass, each overlapping the one before
        array[:, max(0, r0 - 2):min(256, r0 + 18)].read().result()
    chunks = [(r.start, r.stop) for r in decoded]
    assert len(chunks) == len(set(chunks)) == 7  # each chunk decoded once: the bands are cached
    assert max(r.stop - r.start for r in decoded) == TILE  # never more than one tile row at a time


def test_a_pyramid_slide_is_read_at_the_level_closest_to_the_resolution(tmp_path):
    rgb = np.full((512, 384, 3), 255, np.uint8)
    rgb[64:448, 32:352] = np.random.default_rng(1).integers(40, 200, (384, 320, 3))
    write_pyramid_tiff(tmp_path / "p.tiff", rgb, mpp=0.5)
    image = locate(tmp_path / "p.tiff", 2.0, pad=48)  # 5x: the downsample-4 level
    with open_slide(tmp_path / "p.tiff") as s:
        level = s.read_region(1, 0, 0, *s.levels[1].shape)
    assert image.level == 1 and image.box == tissue_box(level)
    assert image.shape[0] % 48 == 0 and image.shape[1] % 48 == 0
    np.testing.assert_array_equal(as_array(image, IMAGENET, (True, False)).read().result(),
                                  independent(level, image.box, 48, (True, False)))
    assert locate(tmp_path / "p.tiff", 0.5).shape[0] > 3 * image.shape[0] // 2  # 20x: level 0
