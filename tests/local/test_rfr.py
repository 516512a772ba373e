"""Random Feature Reconstruction: the sampler, the crops at the same place, the aligned upsampling."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.local.rfr import RFRDecoder, check_patches, crop_patches, sample_patches, upsample_bilinear_aligned


def _coordinates(h, w):
    """(1, h, w, 2): each pixel holds its own (row, col)."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return jnp.asarray(np.stack([rows, cols], -1)[None], jnp.float32)


@pytest.mark.parametrize("prev_hw, scale, patch", [((23, 17), 2, 4), ((11, 8), 1, 6), ((9, 9), 2, 8)])
def test_patches_read_the_same_region_in_both_maps(prev_hw, scale, patch):
    """x_i[r, c] sits at x_{i-1}[r·s, c·s]: a patch's corners map to the target patch's corners."""
    positions, p = sample_patches(np.random.default_rng(0), prev_hw, scale, patch, 50)
    cur = [-(-n // scale) for n in prev_hw]
    assert p == min(patch, *cur, *(n // scale for n in prev_hw))
    x_prev = _coordinates(*prev_hw)
    x = x_prev[:, ::scale, ::scale]                          # a stride-s map of the same place
    assert x.shape[1:3] == tuple(cur)
    xs, ts = crop_patches(x, positions, p), crop_patches(x_prev, positions, p * scale, scale)
    assert xs.shape == (50, p, p, 2) and ts.shape == (50, p * scale, p * scale, 2)
    np.testing.assert_array_equal(xs[:, 0, 0], positions * scale)
    np.testing.assert_array_equal(ts[:, 0, 0], positions * scale)
    np.testing.assert_array_equal(ts[:, -1, -1], (positions + p) * scale - 1)
    np.testing.assert_array_equal(xs[:, -1, -1], (positions + p - 1) * scale)


def test_sampler_covers_every_position_and_stays_inside():
    positions, p = sample_patches(np.random.default_rng(1), (20, 12), 2, 3, 4000)
    # x_i is 10x6: rows 0..min(10-3, (20-6)//2)=7, cols 0..min(6-3, (12-6)//2)=3
    assert p == 3
    assert set(positions[:, 0]) == set(range(8)) and set(positions[:, 1]) == set(range(4))


def test_sampler_refuses_a_map_smaller_than_its_stride():
    with pytest.raises(ValueError, match="too small"):
        sample_patches(np.random.default_rng(0), (1, 5), 2, 4, 3)


def test_bilinear_upsampling_aligns_the_corners():
    """torch's align_corners=True: corners kept, a linear ramp stays the exact linear ramp."""
    h, w, s = 4, 3, 2
    ramp = jnp.asarray((np.arange(h)[:, None] * 3.0 + np.arange(w)[None] * 5.0)[None, :, :, None],
                       jnp.float32)
    up = np.asarray(upsample_bilinear_aligned(ramp, s))[0, :, :, 0]
    rows = np.linspace(0, h - 1, h * s)[:, None]
    cols = np.linspace(0, w - 1, w * s)[None]
    np.testing.assert_allclose(up, rows * 3.0 + cols * 5.0, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(upsample_bilinear_aligned(ramp, 1), ramp)


def test_decoder_maps_to_the_input_channels_and_scale():
    dec = RFRDecoder(16, 8, 2, rngs=nnx.Rngs(0))
    patches = jnp.ones((3, 4, 4, 16))
    assert dec(patches, train=True).shape == (3, 8, 8, 8)
    loss = dec.loss(patches, jnp.zeros((3, 8, 8, 8)), train=False)
    assert loss == pytest.approx(float(jnp.mean(jnp.abs(dec(patches, train=False)))))


def test_crops_need_one_slide():
    with pytest.raises(ValueError, match="batch 1"):
        crop_patches(jnp.zeros((2, 4, 4, 1)), np.zeros((1, 2), np.int32), 2)


def test_patches_past_the_edge_are_refused():
    positions, p = sample_patches(np.random.default_rng(0), (12, 10), 2, 3, 20)
    check_patches((1, 12, 10, 4), positions, p, 2)
    with pytest.raises(ValueError, match=r"reach \(12, 8\) but the map x_\(i-1\) is \(11, 10\)"):
        check_patches((1, 11, 10, 4), np.array([[3, 1]]), 3, 2)
