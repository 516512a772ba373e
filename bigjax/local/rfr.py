"""Random Feature Reconstruction (RFR): the information-preserving loss of a local module.

Zhang et al. keep each module from discarding what later modules need by asking it to reconstruct
its input: S samples ``n`` random patches at the same place in the module's output x_i and its input
x_{i-1} (``p`` pixels of x_i, ``p·s`` of x_{i-1}, where ``s`` is the stride between them); R_i
upsamples x_i's patches bilinearly (corners aligned) by ``s`` and decodes them with
conv3x3 → BatchNorm → ReLU → conv3x3 to x_{i-1}'s channels; the loss is their mean L1 distance to
x_{i-1}'s patches. The patch side is 128 pixels of the first module's output, divided by the
feature stride after it.

References:
    Zhang et al., MICCAI 2022, Sec. 2.2; official code cvlab-stonybrook/local_learning_wsi
    (network/infopro_decoder.py, ``RandomInfoProDecoder``); after Wang et al., "Revisiting Locally
    Supervised Learning" (InfoPro), ICLR 2021.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.layers.modules import BigBatchNorm

__all__ = ["sample_patches", "sample_tile_patches", "check_patches", "crop_patches",
           "rfr_patches", "upsample_bilinear_aligned", "RFRDecoder"]


def sample_patches(rng: np.random.Generator, prev_hw: tuple[int, int], scale: int, patch: int,
                   n: int) -> tuple[np.ndarray, int]:
    """S: ``n`` random top-left corners (in x_i's pixels) and the patch side ``p`` for x_i.

    Args:
      rng: numpy generator (positions are drawn on the host, outside any traced function).
      prev_hw: height and width of x_{i-1}; x_i is ``ceil(prev / scale)`` on each side.
      scale: stride from x_{i-1} to x_i (1 or 2).
      patch: wanted side in x_i's pixels; a map smaller than that clips it to the map.
      n: number of patches (10 in the paper).
    Returns:
      ``(positions (n, 2) int32, p)``: x_i's patch ``[r:r+p, c:c+p]`` covers x_{i-1}'s
      ``[r·s : (r+p)·s, c·s : (c+p)·s]``.
    """
    cur = [-(-side // scale) for side in prev_hw]
    p = min(patch, *cur, *(side // scale for side in prev_hw))
    if p < 1:
        raise ValueError(f"feature map {tuple(prev_hw)} is too small for a patch at stride {scale}")
    # the official sampler draws from [0, space) and fails on a map the size of the patch
    space = [min(c - p, (side - p * scale) // scale) for c, side in zip(cur, prev_hw)]
    positions = np.stack([rng.integers(0, s + 1, n) for s in space], axis=1)
    return positions.astype(np.int32), p


def check_patches(prev_shape, positions, patch: int, scale: int) -> None:
    """Refuse patches that leave x_{i−1} (a slice past the edge would be clamped, silently moved)."""
    if len(positions) == 0:
        return
    far = tuple(int(v) for v in (np.max(np.asarray(positions)[:, -2:], axis=0) + patch) * scale)
    if far[0] > prev_shape[1] or far[1] > prev_shape[2]:
        raise ValueError(f"RFR patches of {patch} px at stride {scale} reach {far} but the map "
                         f"x_(i-1) is {tuple(prev_shape[1:3])}; sample them for this input's shape")


def sample_tile_patches(rng: np.random.Generator, n_tiles: int, prev_hw: tuple[int, int],
                        scale: int, patch: int, n: int) -> tuple[np.ndarray, int]:
    """S on a bag of tiles' maps: ``sample_patches`` corners, each in a random tile.

    Returns ``(positions (n, 3) int32 as (tile, row, column), p)`` for ``crop_patches``.
    """
    corners, p = sample_patches(rng, prev_hw, scale, patch, n)
    tiles = rng.integers(0, n_tiles, n).astype(np.int32)
    return np.concatenate([tiles[:, None], corners], axis=1), p


def crop_patches(x: jax.Array, positions, size: int, scale: int = 1) -> jax.Array:
    """Patches ``x[b, r·scale : r·scale + size, c·scale : c·scale + size]`` stacked: (n, size, size, C).

    ``positions`` are (n, 2) corners ``(r, c)`` in a one-slide map (batch 1, b = 0), or (n, 3)
    ``(b, r, c)`` in a batch of tiles' maps. One gather (a vmapped slice): its transpose scatters
    every patch's cotangent into one map-sized buffer, where a slice per patch would make one each.
    """
    positions = jnp.asarray(positions, jnp.int32)
    if positions.shape[-1] == 2:
        if x.shape[0] != 1:
            raise ValueError(f"local training reads one slide at a time (batch 1), got batch "
                             f"{x.shape[0]}; give (tile, row, column) positions for tile maps")
        positions = jnp.concatenate([jnp.zeros_like(positions[:, :1]), positions], axis=1)
    channels = x.shape[-1]

    def crop(corner):
        start = (corner[0], corner[1] * scale, corner[2] * scale, 0)
        return jax.lax.dynamic_slice(x, start, (1, size, size, channels))[0]
    return jax.vmap(crop)(positions)


def rfr_patches(path, x, x_prev, positions, patch: int, scale: int):
    """S(x_i), S(x_{i−1}): the same places in both maps (coordinates times the stride), on the
    compute device; x_{i−1}'s side carries no gradient (it is the target)."""
    x_patches = crop_patches(x, positions, patch)
    target = crop_patches(jax.lax.stop_gradient(x_prev), positions, patch * scale, scale)
    ex = getattr(path, "execution", None)
    return (x_patches, target) if ex is None else (ex.to_compute(x_patches), ex.to_compute(target))


def _interpolation_matrix(n: int, scale: int) -> np.ndarray:
    """(n·scale, n) weights of 1-D linear interpolation with the corner samples aligned."""
    m = n * scale
    src = np.arange(m) * ((n - 1) / (m - 1)) if m > 1 else np.zeros(1)
    lo = np.clip(np.floor(src).astype(int), 0, n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = (src - lo).astype(np.float32)
    eye = np.eye(n, dtype=np.float32)
    return (1 - w)[:, None] * eye[lo] + w[:, None] * eye[hi]


def upsample_bilinear_aligned(x: jax.Array, scale: int) -> jax.Array:
    """Bilinear upsampling of NHWC ``x`` by an integer ``scale``, as torch's ``align_corners=True``."""
    if scale == 1:
        return x
    mh = _interpolation_matrix(x.shape[1], scale)
    mw = _interpolation_matrix(x.shape[2], scale)
    return jnp.einsum("ih,jw,nhwc->nijc", mh, mw, x)


class RFRDecoder(nnx.Module):
    """R_i: upsample x_i's patches by ``scale``, conv3x3 → BatchNorm → ReLU → conv3x3 to x_{i-1}'s channels.

    Args:
      channels: x_i's channels (also the hidden width, as the official configuration).
      out_channels: x_{i-1}'s channels.
      scale: stride from x_{i-1} to x_i.
    """

    def __init__(self, channels: int, out_channels: int, scale: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(channels, channels, (3, 3), padding=1, rngs=rngs)
        self.norm = BigBatchNorm(channels)
        self.conv2 = nnx.Conv(channels, out_channels, (3, 3), padding=1, rngs=rngs)
        self.scale = scale

    def __call__(self, patches: jax.Array, *, train: bool) -> jax.Array:
        h = self.conv1(upsample_bilinear_aligned(patches, self.scale))
        return self.conv2(jax.nn.relu(self.norm.plain(h, train=train)))

    def loss(self, x_patches: jax.Array, target_patches: jax.Array, *, train: bool) -> jax.Array:
        """L1(R_i(S(x_i)), S(x_{i-1})), the mean absolute error over all patch values."""
        return jnp.mean(jnp.abs(self(x_patches, train=train) - target_patches))
