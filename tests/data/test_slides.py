"""Slide reading and the foreground rules, checked against independent computations."""
import numpy as np
import pytest
import tifffile
from PIL import Image

from bigjax.data.slides import (SlideReadError, foreground_tiles, open_slide, panda_foreground, pick_level,
                                tile_grid)
from bigjax.data.synthetic import write_pyramid_tiff

from .conftest import TILE


def _slides(panda_dir):
    return sorted((panda_dir / "train_images").glob("*.tiff"))


def _independent_panda_count(rgb: np.ndarray, t: int) -> tuple[int, set]:
    """Count tiles with >= 60 % greyscale in [3, 230], greyscale by Pillow, tile by tile."""
    kept = set()
    for r in range(rgb.shape[0] // t):
        for c in range(rgb.shape[1] // t):
            grey = np.asarray(Image.fromarray(rgb[r * t:(r + 1) * t, c * t:(c + 1) * t]).convert("L"))
            if ((grey >= 3) & (grey <= 230)).sum() >= 0.6 * t * t:
                kept.add((r * t, c * t))
    return len(kept), kept


def test_tile_counts_equal_independent_panda_rule(panda_dir):
    total = 0
    for path in _slides(panda_dir):
        with open_slide(path) as slide:
            found = [c for _, coords in foreground_tiles(slide, 0, TILE) for c in map(tuple, coords)]
        expected_n, expected = _independent_panda_count(tifffile.imread(path), TILE)
        assert len(found) == expected_n
        assert set(found) == expected
        total += expected_n
    assert total > 0


def test_read_region_equals_tifffile(panda_dir):
    path = _slides(panda_dir)[0]
    with open_slide(path) as slide:
        for level in range(len(slide.levels)):
            full = tifffile.imread(path, level=level)
            h, w = full.shape[:2]
            np.testing.assert_array_equal(slide.read_region(level, 3, 5, h - 7, w - 9), full[3:h - 4, 5:w - 4])


def test_levels_and_pick_level(panda_dir):
    with open_slide(_slides(panda_dir)[0]) as slide:
        assert [round(lv.downsample) for lv in slide.levels] == [1, 4, 16]
        assert slide.levels[0].mpp == pytest.approx(0.5)
        assert pick_level(slide.levels, None) == 0
        assert pick_level(slide.levels, 2.1) == 1
        assert pick_level(slide.levels, 10.0) == 2


def test_truncated_tiff_names_the_file(panda_dir, tmp_path):
    data = _slides(panda_dir)[0].read_bytes()
    bad = tmp_path / "cut.tiff"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError, match=r"cut\.tiff.*truncated"):
        open_slide(bad)


def test_not_a_tiff_and_missing_file(tmp_path):
    junk = tmp_path / "junk.tiff"
    junk.write_bytes(b"hello, not an image at all")
    with pytest.raises(SlideReadError, match=r"junk\.tiff: not a TIFF"):
        open_slide(junk)
    with pytest.raises(SlideReadError, match="no such file"):
        open_slide(tmp_path / "absent.tiff")


def test_empty_slide_has_no_tiles(tmp_path):
    path = tmp_path / "white.tiff"
    write_pyramid_tiff(path, np.full((256, 256, 3), 250, np.uint8), mpp=0.5)
    with open_slide(path) as slide:
        for rule in ("panda", "camelyon"):
            assert list(foreground_tiles(slide, 0, TILE, rule)) == []


def test_camelyon_rule_keeps_the_tissue_half(tmp_path):
    rgb = np.full((512, 512, 3), 245, np.uint8)
    rgb[:, :256] = (200, 120, 170)  # saturated tissue on the left half
    path = tmp_path / "half.tiff"
    write_pyramid_tiff(path, rgb, mpp=0.25)
    with open_slide(path) as slide:
        coords = np.concatenate([c for _, c in foreground_tiles(slide, 0, 64, "camelyon")])
        rows, cols = tile_grid(slide.levels[0], 64)
    assert len(coords) == rows * cols // 2
    assert coords[:, 1].max() < 256


def test_panda_foreground_thresholds():
    tiles = np.full((3, 10, 10, 3), 255, np.uint8)
    tiles[0, :6] = 120  # 60 % tissue: kept
    tiles[1, :5] = 120  # 50 %: dropped
    tiles[2] = 1  # black (greyscale below 3): dropped
    np.testing.assert_array_equal(panda_foreground(tiles), [True, False, False])


def test_openslide_backend_reads_level_zero_like_tifffile(panda_dir):
    pytest.importorskip("openslide", reason="optional extra bigjax[openslide]")
    from bigjax.data.slides import OpenSlideSlide, TiffSlide

    path = _slides(panda_dir)[0]
    with OpenSlideSlide(path) as theirs, TiffSlide(path) as ours:
        assert [lv.shape for lv in theirs.levels] == [lv.shape for lv in ours.levels]
        assert theirs.levels[0].mpp == pytest.approx(0.5)
        h, w = ours.levels[0].shape
        np.testing.assert_array_equal(theirs.read_region(0, 7, 3, h - 9, w - 5), ours.read_region(0, 7, 3, h - 9, w - 5))


def test_16_bit_slides_are_scaled_to_8_bits(tmp_path):
    rgb16 = np.zeros((64, 96, 3), np.uint16)
    rgb16[:, :48] = [31010, 65535, 257]
    rgb16[:, 48:] = [0, 12850, 40000]
    path = tmp_path / "deep.tiff"
    tifffile.imwrite(path, rgb16, photometric="rgb", tile=(32, 32))
    with open_slide(path) as slide:
        got = slide.read_region(0, 0, 0, 64, 96)
    np.testing.assert_array_equal(got, np.rint(rgb16 / 257.0).astype(np.uint8))  # 31010 -> 121, not 34
    assert tuple(got[0, 0]) == (121, 255, 1)


def test_12_bit_grey_in_16_and_float_samples(tmp_path):
    grey = np.full((32, 32), 4095, np.uint16)
    path = tmp_path / "grey12.tiff"
    tifffile.imwrite(path, grey, photometric="minisblack", bitspersample=12)
    with open_slide(path) as slide:
        assert (slide.read_region(0, 0, 0, 32, 32) == 255).all()
    path = tmp_path / "float.tiff"
    tifffile.imwrite(path, np.ones((32, 32, 3), np.float32), photometric="rgb")
    with pytest.raises(SlideReadError, match=r"float.tiff: 32-bit float32 samples are not supported"):
        open_slide(path)


def test_a_refused_slide_keeps_no_file_open(tmp_path):
    import os

    path = tmp_path / "float.tiff"
    tifffile.imwrite(path, np.ones((32, 32, 3), np.float32), photometric="rgb")

    def open_handles():
        fds = os.listdir("/proc/self/fd")
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") == str(path.resolve()) for fd in fds
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    with pytest.raises(SlideReadError) as refused:
        open_slide(path)
    assert open_handles() == 0, refused  # the traceback still holds the half-made slide
