"""Moving partitions: cut a band out of a host array, join output bands back together on the host."""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax import lax

from bigjax.layers.plan import Partition

__all__ = ["take_band", "join_bands", "join_on_host", "aligned_empty"]


@functools.partial(jax.jit, static_argnames=("size",))
def _slice(x, starts, *, size):
    # dynamic starts: one executable per band size, not one per band position
    rows = lax.dynamic_slice_in_dim(x, starts[0], size[0], 0)
    return lax.dynamic_slice_in_dim(rows, starts[1], size[1], 1)


def take_band(x: jax.Array, n0: int, n1: int, r0: int, r1: int) -> jax.Array:
    """Images [n0, n1), rows [r0, r1) of an NHWC array, sliced where ``x`` lives (the host)."""
    if (n0, r0) == (0, 0) and (n1, r1) == x.shape[:2]:
        return x
    starts = jax.device_put(np.array([n0, r0], np.int32), x.sharding)  # explicit, with the band
    return _slice(x, starts, size=(n1 - n0, r1 - r0))


def join_bands(bands: list[tuple[Partition, jax.Array]]) -> jax.Array:
    """Join bands in plan order (rows within an image chunk, then the chunks) into one host array.

    Each band is copied into a preallocated buffer and dropped from ``bands`` (emptied), so the join
    holds the output and the bands not yet copied, never the bands beside their concatenation (issue
    21, goal 1: "write bands in place into preallocated buffers"). The buffer is 64-byte aligned:
    JAX adopts it without a copy on the CPU."""
    if len(bands) == 1:
        return bands.pop()[1]
    sharding, dtype = bands[0][1].sharding, bands[0][1].dtype
    out = aligned_empty(_joined_shape(bands), dtype)
    bands.reverse()  # popped from the end: in plan order
    n0, row = None, 0
    while bands:
        p, band = bands.pop()
        if p.n0 != n0:  # a new image chunk
            n0, row = p.n0, 0
        out[p.n0:p.n1, row:row + band.shape[1]] = np.asarray(band)
        row += band.shape[1]
        del band
    return jax.device_put(out, sharding)


def _joined_shape(bands) -> tuple[int, ...]:
    first = bands[0][0].n0
    rows = sum(band.shape[1] for p, band in bands if p.n0 == first)
    return (max(p.n1 for p, _ in bands), rows, *bands[0][1].shape[2:])


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised numpy array whose data starts on an ``align``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def join_on_host(ex, bands: list[tuple[Partition, jax.Array]]) -> jax.Array:
    """Adopt each band in host memory, then join them: where copies are staged (``to_host_async``)
    the blocking reads come here, after the loop has dispatched every band. ``bands`` is emptied, so
    the join frees each band once it is copied."""
    adopted = [(p, ex.to_host(band)) for p, band in bands]
    bands.clear()
    return ex.call("join_bands", join_bands, adopted)
