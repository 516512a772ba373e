"""Tissue boxes remembered beside the run: the boxes ``locate`` finds, each slide decoded once."""
import json
import logging
import os

import numpy as np
import pytest
import tifffile

from bigjax.data import slide_array, tissue_boxes
from bigjax.data.slide_array import locate
from bigjax.data.tissue_boxes import locate_all


def _slide(path, top, seed):
    rgb = np.full((120, 90, 3), 255, np.uint8)
    rgb[top:top + 50, 10:70] = np.random.default_rng(seed).integers(20, 220, (50, 60, 3))
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(32, 32), compression="zlib")
    return path


def _boxes(cache) -> int:
    return sum(len(slide["boxes"]) for slide in json.loads(cache.read_text()).values())


@pytest.fixture
def slides(tmp_path):
    return [_slide(tmp_path / f"s{i}.tiff", 5 + 30 * i, i) for i in range(3)]


@pytest.fixture
def located(monkeypatch):
    """The paths ``locate`` decodes, in order."""
    calls = []

    def counting(path, mpp, pad=1):
        calls.append(path)
        return locate(path, mpp, pad)
    monkeypatch.setattr(tissue_boxes, "locate", counting)
    return calls


def test_the_cached_boxes_are_the_boxes_locate_finds_and_no_slide_is_decoded_again(
        tmp_path, slides, located):
    cache = tmp_path / "run" / tissue_boxes.CACHE_NAME
    cache.parent.mkdir()
    first = locate_all(slides, None, 16, cache)
    assert first == [slide_array.locate(p, None, 16) for p in slides]
    assert [i.box[0] for i in first] == [5, 35, 65]  # three different boxes
    assert located == slides and cache.exists()
    again = locate_all(slides, None, 16, cache)
    assert again == first and located == slides  # nothing decoded the second time
    assert not list(cache.parent.glob("*.tmp"))


def test_a_rewritten_slide_or_other_settings_are_located_again(tmp_path, slides, located):
    cache = tmp_path / tissue_boxes.CACHE_NAME
    locate_all(slides, None, 16, cache)
    _slide(slides[1], 60, 7)  # the same name, other pixels: size or mtime differ
    os.utime(slides[1], ns=(1, 1))
    images = locate_all(slides, None, 16, cache)
    assert located == slides + [slides[1]] and images[1].box[0] == 60
    locate_all(slides[:1], None, 32, cache)  # another pad: another shape
    assert located[-1] == slides[0] and _boxes(cache) == 4  # the rewritten slide's old box dropped


def test_an_unreadable_cache_is_logged_and_rebuilt(tmp_path, slides, located, caplog):
    cache = tmp_path / tissue_boxes.CACHE_NAME
    cache.write_text("{truncated")
    with caplog.at_level(logging.WARNING, "bigjax.data.tissue_boxes"):
        images = locate_all(slides, None, 16, cache)
    assert images == [locate(p, None, 16) for p in slides] and located == slides
    assert "unreadable" in caplog.text and str(cache) in caplog.text
    assert _boxes(cache) == 3
