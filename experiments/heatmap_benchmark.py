"""Time and peak host memory of one heatmap of a 100,000 px slide (docs/benchmarks.md).

    python -m experiments.heatmap_benchmark --out=runs/heatmap_bench [--side_px=100000]

Writes (once) a pyramidal JPEG TIFF of side_px x side_px pixels with levels at downsample 1, 4, 16
whose tissue is coarse blobs (every 256 px TIFF tile is one colour, so writing 150,000 tiles takes
minutes, not hours), then in a fresh process draws the heatmap of random scores on every tissue tile
of 256 level-0 px (``bigjax.train.heatmap.draw``, 1024 px thumbnail, blur 1 tile) and prints the
seconds and the peak resident memory (VmHWM) before and after drawing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bigjax.errors import ArgumentParser

TILE = 256
DOWNSAMPLES = (1, 4, 16)


def tissue_grid(side_px: int, seed: int = 0) -> np.ndarray:
    """bool (n, n) tissue of each 256 px level-0 tile: thresholded smooth noise, about half tissue."""
    from scipy import ndimage

    n = side_px // TILE
    field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(n, n)), n / 12)
    return field > np.median(field)


def write_slide(path: Path, side_px: int) -> None:
    """The pyramid, written tile by tile from the tissue grid (pink tissue, white background)."""
    import tifffile

    tissue = tissue_grid(side_px)
    colours = {True: np.array([200, 120, 180], np.uint8), False: np.array([243, 243, 243], np.uint8)}
    blocks = {k: np.broadcast_to(v, (TILE, TILE, 3)).copy() for k, v in colours.items()}

    def tiles(d: int):
        n = -(-side_px // d // TILE)
        for r in range(n):
            for c in range(n):
                yield blocks[bool(tissue[min(r * d, len(tissue) - 1), min(c * d, len(tissue) - 1)])]

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for d in DOWNSAMPLES:
            side = side_px // d
            tif.write(tiles(d), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      compression="jpeg", subfiletype=0 if d == 1 else 1)


def measure(path: Path, side_px: int) -> dict:
    """Draw once (this process): seconds and VmHWM in MiB before and after."""
    from bigjax.train.heatmap import draw

    cells = np.argwhere(tissue_grid(side_px))
    coords = cells * TILE
    scores = np.random.default_rng(1).random(len(coords))
    before = _hwm_mib()
    start = time.perf_counter()
    image = draw(path, coords, TILE, scores, side=1024, blur=1.0)
    seconds = time.perf_counter() - start
    return {"tiles": len(coords), "seconds": round(seconds, 2), "vmhwm_before_mib": before,
            "vmhwm_after_mib": _hwm_mib(), "image": list(image.size)}


def _hwm_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) // 1024
    return -1


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/heatmap_bench")
    p.add_argument("--side_px", type=int, default=100_000)
    p.add_argument("--measure_only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    path = Path(a.out) / f"slide_{a.side_px}.tiff"
    if a.measure_only:
        print(json.dumps(measure(path, a.side_px)))
        return 0
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_slide(path, a.side_px)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s")
    # a fresh process: its peak memory is the heatmap's, not the writer's
    subprocess.run([sys.executable, "-m", "experiments.heatmap_benchmark", f"--out={a.out}",
                    f"--side_px={a.side_px}", "--measure_only"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
