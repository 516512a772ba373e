"""Tissue boxes found once per slide file, remembered in a JSON file beside the run.

``slide_array.locate`` decodes a slide's level band by band to find its tissue box: one pass over the
data before a run's first step, on every start, resumed or not. Here the boxes found are written to a
JSON file (the run's workdir holds it), keyed by the slide file (resolved path, size, modification
time) and the settings the box depends on (``mpp``, ``pad``), so a resumed or repeated run locates only
the slides it has not seen, or that changed since. A cache that does not parse is logged and rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

from bigjax.data.slide_array import SlideImage, locate

__all__ = ["locate_all", "CACHE_NAME"]

CACHE_NAME = "tissue_boxes.json"
log = logging.getLogger(__name__)


def locate_all(paths: Sequence, mpp: float | None, pad: int, cache_file) -> list[SlideImage]:
    """``locate(path, mpp, pad)`` of every path, from ``cache_file`` where it holds that slide.

    The cache maps a slide's resolved path to its ``stamp`` (size, modification time) and its
    ``boxes`` by setting: a slide whose stamp changed starts with no boxes."""
    cache_file = Path(cache_file)
    cache = _read(cache_file)
    setting = f"mpp={mpp}|pad={pad}"
    images, changed = [], False
    for path in paths:
        name, stamp = _file(path)
        slide = cache.get(name)
        if not isinstance(slide, dict) or slide.get("stamp") != stamp or not isinstance(
                slide.get("boxes"), dict):
            slide = cache[name] = {"stamp": stamp, "boxes": {}}
        entry = slide["boxes"].get(setting)
        if entry is None:
            image = locate(path, mpp, pad)
            slide["boxes"][setting] = {"level": image.level, "box": image.box, "shape": image.shape,
                                       "band": image.band}
            changed = True
        else:
            image = SlideImage(Path(path), entry["level"], tuple(entry["box"]), tuple(entry["shape"]),
                               entry["band"])
        images.append(image)
    if changed:
        _write(cache_file, cache)
    return images


def _file(path) -> tuple[str, str]:
    """The slide file's resolved name and its stamp as it is now (size, modification time)."""
    stat = os.stat(path)
    return str(Path(path).resolve()), f"{stat.st_size}|{stat.st_mtime_ns}"


def _read(cache_file: Path) -> dict:
    if not cache_file.exists():
        return {}
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            raise ValueError("not a JSON object")
        return cache
    except (ValueError, UnicodeDecodeError) as e:
        log.warning("%s: unreadable (%s); locating every slide again", cache_file, e)
        return {}


def _write(cache_file: Path, cache: dict) -> None:
    """To a temporary name, then renamed: a run killed mid-write leaves the old cache."""
    tmp = cache_file.with_name(cache_file.name + ".tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, cache_file)
