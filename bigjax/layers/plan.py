"""Partition planning for Big-Layers: split an NHWC activation over batch, then rows, with halos.

Every partitioned op asks this module for its partitions; none re-derives band sizes. A partition is a
chunk of whole images when at least one whole image fits ``max_partition_bytes``; otherwise it is a band
of output rows of one image whose input band carries the halo rows the kernel needs (the "Big-Layers"
paper, Algorithm 1: partition over the batch first, then over rows). Bands are as large as the budget
allows and balanced, so at most two band shapes occur per layer (each compiled once).

The budget counts what one partition puts on the device: its input band (with halo), its output band,
the kernel and its gradient, and an estimate of the kernel's scratch space (one more output band).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ConvGeometry", "Footprint", "Partition", "plan_partitions", "IDENTITY"]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel size, stride, padding and dilation of a 2-D convolution (torch conventions)."""

    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @classmethod
    def make(cls, kernel, stride=1, padding=0, dilation=1) -> "ConvGeometry":
        """Build from ints or pairs, as ``torch.nn.functional.conv2d`` takes them."""
        g = cls(_pair(kernel), _pair(stride), _pair(padding), _pair(dilation))
        if min(g.stride) < 1 or min(g.dilation) < 1 or min(g.kernel) < 1 or min(g.padding) < 0:
            raise ValueError(f"invalid convolution geometry {g}")
        return g

    @property
    def span(self) -> tuple[int, int]:
        """Input rows/cols one output pixel reads: (k - 1) * dilation + 1."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilation))

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """Output height and width for an ``h`` x ``w`` input."""
        sizes = []
        for n, p, s, e in zip((h, w), self.padding, self.stride, self.span):
            out = (n + 2 * p - e) // s + 1
            if out < 1:
                raise ValueError(f"input {h}x{w} is smaller than the kernel span {self.span}")
            sizes.append(out)
        return tuple(sizes)

    def input_rows(self, r0: int, r1: int) -> tuple[int, int]:
        """Unclipped input rows [i0, i1) that output rows [r0, r1) read (may reach into padding)."""
        s, p, e = self.stride[0], self.padding[0], self.span[0]
        return r0 * s - p, (r1 - 1) * s - p + e

    @property
    def min_band_rows(self) -> int:
        """Smallest band whose input step covers the halo of the band before it (overlap-add carry)."""
        return max(1, math.ceil(self.span[0] / self.stride[0]) - 1)


IDENTITY = ConvGeometry()


@dataclass(frozen=True)
class Footprint:
    """What one partition holds on the device, in buffers of its input and output band size (a
    fraction where a buffer is narrower than the unit, e.g. a bfloat16 band beside float32 ones)."""

    in_buffers: float
    out_buffers: float
    fixed_bytes: int = 0
    carry: bool = False  # a band's halo of input gradient waits on the device for the next band


@dataclass(frozen=True)
class Partition:
    """Images [n0, n1), output rows [r0, r1), the input rows [i0, i1) they read, zero rows to pad."""

    n0: int
    n1: int
    r0: int
    r1: int
    i0: int
    i1: int
    pad_top: int
    pad_bottom: int


def _band_bytes(shape, geom, fp, itemsize, n_img, rows, cout) -> int:
    """Device bytes of a partition of ``n_img`` images and ``rows`` output rows (worst-case halo)."""
    _, h, w, cin = shape
    oh, ow = geom.out_size(h, w)
    i0, i1 = geom.input_rows(0, rows) if rows < oh else (0, h)
    in_rows = min(i1 - i0, h)
    in_b = n_img * in_rows * w * cin * itemsize
    out_b = n_img * rows * ow * cout * itemsize
    carry = n_img * max(geom.span[0] - geom.stride[0], 0) * w * cin * itemsize if fp.carry else 0
    return fp.fixed_bytes + math.ceil(fp.in_buffers * in_b + fp.out_buffers * out_b) + carry


def plan_partitions(shape, cout: int, geom: ConvGeometry, fp: Footprint, budget: int,
                    itemsize: int = 4, what: str = "layer") -> list[Partition]:
    """Partitions of an NHWC input of ``shape`` for an op producing ``cout`` channels.

    Args:
      shape: (N, H, W, C) of the op's input.
      cout: channels of the op's output.
      geom: the op's convolution geometry (``IDENTITY`` for elementwise ops and reductions).
      fp: the op's device footprint per partition.
      budget: ``max_partition_bytes``.
      what: the op's name, for the error message.
    Returns:
      Partitions in row-major order (images, then rows), covering every output row exactly once.
    Raises:
      ValueError: the budget cannot hold the smallest band of one image; says what would.
    """
    n, h, w, _ = shape
    oh, _ = geom.out_size(h, w)
    per_image = _band_bytes(shape, geom, fp, itemsize, 1, oh, cout) - fp.fixed_bytes
    if fp.fixed_bytes + per_image <= budget:
        fit = (budget - fp.fixed_bytes) // per_image
        chunks = math.ceil(n / min(fit, n))
        size = math.ceil(n / chunks)
        return [_partition(geom, h, n0, min(n0 + size, n), 0, oh) for n0 in range(0, n, size)]
    rows = _rows_that_fit(shape, cout, geom, fp, budget, itemsize, what)
    bands = math.ceil(oh / rows)
    size = max(math.ceil(oh / bands), min(geom.min_band_rows, oh))
    return [_partition(geom, h, i, i + 1, r0, min(r0 + size, oh))
            for i in range(n) for r0 in range(0, oh, size)]


def _rows_that_fit(shape, cout, geom, fp, budget, itemsize, what) -> int:
    """Largest band height (output rows of one image) that fits ``budget``."""
    oh, _ = geom.out_size(shape[1], shape[2])
    smallest = min(geom.min_band_rows, oh)
    need = _band_bytes(shape, geom, fp, itemsize, 1, smallest, cout)
    if need > budget:
        raise ValueError(
            f"max_partition_bytes={budget:,} B is below the smallest partition of this {what} "
            f"({smallest} output row(s) of one {shape[1]}x{shape[2]}x{shape[3]} image with its halo): "
            f"needs {need:,} B"
        )
    lo, hi = smallest, oh
    while lo < hi:  # cost grows with rows: bisect for the largest that fits
        mid = (lo + hi + 1) // 2
        if _band_bytes(shape, geom, fp, itemsize, 1, mid, cout) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _partition(geom, h, n0, n1, r0, r1) -> Partition:
    i0, i1 = geom.input_rows(r0, r1)
    c0, c1 = max(i0, 0), min(i1, h)
    return Partition(n0, n1, r0, r1, c0, c1, c0 - i0, i1 - c1)
