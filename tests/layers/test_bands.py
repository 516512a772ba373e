"""Joining output bands on the host: the same array as their concatenation, each band dropped once
copied (issue 21: the join holds the output and the bands not yet copied, never both in full)."""

import gc
import weakref

import jax
import ml_dtypes
import numpy as np
import pytest

from bigjax.layers.bands import join_bands, join_on_host
from bigjax.layers.plan import Partition
from tests.layers.helpers import EX


def _bands(dtype, chunks, rows, w=5, c=3, seed=0):
    """Bands of ``chunks`` (image ranges) cut into ``rows`` row counts each, and their concatenation."""
    rng = np.random.default_rng(seed)
    n, h = chunks[-1][1], sum(rows)
    full = rng.normal(size=(n, h, w, c)).astype(dtype)
    bands = []
    for n0, n1 in chunks:
        r0 = 0
        for r in rows:
            p = Partition(n0, n1, r0, r0 + r, r0, r0 + r, 0, 0)
            bands.append((p, jax.device_put(full[n0:n1, r0:r0 + r], EX.host)))
            r0 += r
    return bands, full


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("chunks, rows", [([(0, 1), (1, 2), (2, 3)], [4, 7, 2]),  # odd bands per image
                                          ([(0, 2), (2, 3)], [11]),  # whole images, two at once
                                          ([(0, 1)], [3, 3, 1])])
def test_the_join_equals_the_concatenation(dtype, chunks, rows):
    bands, full = _bands(dtype, chunks, rows)
    joined = join_bands(bands)
    assert bands == []  # emptied
    assert joined.dtype == full.dtype and joined.devices() == {EX.host}
    np.testing.assert_array_equal(np.asarray(joined), full)


def test_each_band_is_freed_by_the_join():
    bands, full = _bands(np.float32, [(0, 1), (1, 2)], [6, 5])
    refs = [weakref.ref(band) for _, band in bands]
    seen = []

    def observer(event, fn, *args, **kwargs):
        out = fn(*args, **kwargs)
        if event == "join_bands":
            gc.collect()
            seen.extend(ref() is None for ref in refs)
        return out
    joined = join_on_host(EX.replace(observer=observer), bands)
    assert seen == [True] * 4 and bands == []  # none outlives the join: the caller's list emptied too
    np.testing.assert_array_equal(np.asarray(joined), full)
