"""Moving partitions: cut a band out of a host array, join output bands back together on the host."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bigjax.layers.plan import Partition

__all__ = ["take_band", "join_bands", "join_on_host"]


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
    """Concatenate bands in plan order: rows within an image chunk, then the chunks (on the host)."""
    if len(bands) == 1:
        return bands[0][1]
    chunks, rows = [], []
    for i, (p, band) in enumerate(bands):
        rows.append(band)
        if i + 1 == len(bands) or bands[i + 1][0].n0 != p.n0:
            chunks.append(rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=1))
            rows = []
    return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=0)


def join_on_host(ex, bands: list[tuple[Partition, jax.Array]]) -> jax.Array:
    """Adopt each band in host memory, then join them: where copies are staged (``to_host_async``)
    the blocking reads come here, after the loop has dispatched every band."""
    bands = [(p, ex.to_host(band)) for p, band in bands]
    return ex.call("join_bands", join_bands, bands)
