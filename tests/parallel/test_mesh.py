"""The tiles' layout over the encoder mesh: balanced shards, padding at each shard's end, a mask."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bigjax.parallel import AXIS, ShardLayout, encoder_mesh
from bigjax.parallel.mesh import to_mesh


@pytest.mark.parametrize("n,shards,sizes,index", [
    (5, 2, (3, 2), [0, 1, 2, 3, 4]),
    (5, 4, (2, 1, 1, 1), [0, 1, 2, 4, 6]),
    (3, 4, (1, 1, 1, 0), [0, 1, 2]),  # fewer tiles than devices: one shard is all padding
    (4, 1, (4,), [0, 1, 2, 3]),
])
def test_layout_spreads_tiles_and_pads_each_shard(n, shards, sizes, index):
    layout = ShardLayout(n, shards)
    assert layout.sizes == sizes and layout.index.tolist() == index
    tiles = np.arange(n, dtype=np.float32)[:, None] + 1
    padded = layout.pad(tiles)
    assert padded.shape == (shards * layout.per_shard, 1)
    np.testing.assert_array_equal(padded[layout.index], tiles)  # no tile dropped, order kept
    assert padded[layout.mask == 0].sum() == 0 and layout.mask.sum() == n
    np.testing.assert_array_equal(np.concatenate(layout.split(tiles)), tiles)


def test_layout_and_mesh_errors_name_the_values():
    with pytest.raises(ValueError, match="0 tiles on 2 shards"):
        ShardLayout(0, 2)
    with pytest.raises(ValueError, match="given 4"):
        ShardLayout(5, 2).pad(np.zeros((4, 1)))
    with pytest.raises(ValueError, match="mesh of 9 devices"):
        encoder_mesh(9)


def test_to_mesh_lays_out_and_keeps_arrays_already_there():
    mesh = encoder_mesh(2)
    x = to_mesh(np.arange(6.0), mesh, P(AXIS))
    assert [s.data.tolist() for s in x.addressable_shards] == [[0, 1, 2], [3, 4, 5]]
    assert to_mesh(x, mesh, P(AXIS)) is x
