"""Per-slide augmentation: one random draw, applied identically to every tile of a bag.

`sample_params(rng)` draws an `AugmentParams` (horizontal/vertical flip, 90° rotations, a small
rotation, Gaussian blur, brightness/contrast/saturation jitter) on the host; `augment_bag(tiles,
params)` applies it to a whole uint8 (K, T, T, 3) bag in one jitted JAX function (vectorised over
tiles and pixels; params are traced, so a new draw does not recompile). The order is: colour,
blur, flips, 90° rotation, small rotation (bilinear, mirrored edges); colour and blur commute with
the geometric steps (up to clipping and edges), and doing them first keeps the gathers last.
Run it where the bag lives: on the accelerator inside the training step, or on the host.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BLUR_RADIUS = 4  # taps each side of the Gaussian kernel; covers sigma up to ~1.5 px


class AugmentParams(NamedTuple):
    """One slide's augmentation draw (scalars; a pytree, so it can cross jit)."""

    flip_h: np.ndarray  # bool
    flip_v: np.ndarray  # bool
    rot90: np.ndarray  # int32, quarter turns counter-clockwise
    angle: np.ndarray  # float32, degrees, counter-clockwise
    blur_sigma: np.ndarray  # float32, pixels; 0 = no blur
    brightness: np.ndarray  # float32 factor
    contrast: np.ndarray  # float32 factor around mid-grey
    saturation: np.ndarray  # float32 factor around each pixel's luma

    @classmethod
    def identity(cls) -> "AugmentParams":
        """Parameters that leave tiles unchanged."""
        return cls(np.bool_(False), np.bool_(False), np.int32(0), np.float32(0), np.float32(0),
                   np.float32(1), np.float32(1), np.float32(1))


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random draw.

    Attributes:
      max_angle: small rotation drawn uniformly in [-max_angle, max_angle] degrees.
      blur_prob: probability of blurring; sigma then uniform in blur_sigma.
      brightness, contrast, saturation: factors drawn uniformly in [1 - x, 1 + x].
    """

    max_angle: float = 15.0
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1


def sample_params(rng: np.random.Generator, config: AugmentConfig = AugmentConfig()) -> AugmentParams:
    """Draw one slide's augmentation parameters from `rng` (same rng state -> same params)."""
    flip_h, flip_v = rng.random(2) < 0.5
    rot90 = rng.integers(4)
    angle = rng.uniform(-config.max_angle, config.max_angle)
    blur = rng.uniform(*config.blur_sigma) if rng.random() < config.blur_prob else 0.0
    jitter = rng.uniform(-1, 1, 3) * np.array([config.brightness, config.contrast, config.saturation]) + 1
    return AugmentParams(np.bool_(flip_h), np.bool_(flip_v), np.int32(rot90), np.float32(angle),
                         np.float32(blur), *(np.float32(j) for j in jitter))


@jax.jit
def augment_bag(tiles: jax.Array, params: AugmentParams) -> jax.Array:
    """Apply `params` to every tile of a uint8 (K, T, T, 3) bag of square tiles; returns uint8 (K, T, T, 3)."""
    x = tiles.astype(jnp.float32) / 255.0
    x = _colour(x, params.brightness, params.contrast, params.saturation)
    x = jax.lax.cond(params.blur_sigma > 1e-2, _blur, lambda t, _: t, x, params.blur_sigma)
    # materialise before the gathers: fused into them, XLA would recompute the blur per sample point
    x = jax.lax.optimization_barrier(x)
    x = jnp.where(params.flip_h, x[:, :, ::-1], x)
    x = jnp.where(params.flip_v, x[:, ::-1], x)
    x = jax.lax.switch(params.rot90, [lambda t, k=k: jnp.rot90(t, k, axes=(1, 2)) for k in range(4)], x)
    x = jax.lax.cond(params.angle != 0, _rotate, lambda t, _: t, x, params.angle)
    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def _rotate(x: jax.Array, degrees: jax.Array) -> jax.Array:
    """Rotate every (T, T) tile about its centre by `degrees`, bilinear, mirrored at the edges."""
    size = x.shape[1]
    centre = (size - 1) / 2.0
    theta = jnp.deg2rad(degrees)
    yy, xx = jnp.meshgrid(jnp.arange(size, dtype=jnp.float32) - centre,
                          jnp.arange(size, dtype=jnp.float32) - centre, indexing="ij")
    src_y = centre + jnp.cos(theta) * yy - jnp.sin(theta) * xx
    src_x = centre + jnp.sin(theta) * yy + jnp.cos(theta) * xx
    y0, x0 = jnp.floor(src_y), jnp.floor(src_x)
    wy, wx = (src_y - y0)[..., None], (src_x - x0)[..., None]
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)

    def at(iy, ix):
        return x[:, _mirror(iy, size), _mirror(ix, size)]

    top = at(y0, x0) * (1 - wx) + at(y0, x0 + 1) * wx
    bottom = at(y0 + 1, x0) * (1 - wx) + at(y0 + 1, x0 + 1) * wx
    return top * (1 - wy) + bottom * wy


def _mirror(i: jax.Array, size: int) -> jax.Array:
    """Indices reflected into [0, size) (edge pixel repeated, like numpy's "symmetric" pad)."""
    i = jnp.mod(i, 2 * size)
    return jnp.where(i >= size, 2 * size - 1 - i, i)


def _blur(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """Separable Gaussian blur of every tile (sigma > 0), mirrored at the edges."""
    r = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=jnp.float32)
    kernel = jnp.exp(-0.5 * (r / sigma) ** 2)
    kernel = kernel / kernel.sum()
    size = x.shape[1]
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (BLUR_RADIUS, BLUR_RADIUS)
        padded = jnp.pad(x, pad, mode="symmetric")
        x = sum(kernel[k] * jax.lax.slice_in_dim(padded, k, k + size, axis=axis) for k in range(2 * BLUR_RADIUS + 1))
    return x


def _colour(x: jax.Array, brightness: jax.Array, contrast: jax.Array, saturation: jax.Array) -> jax.Array:
    """Brightness (scale), contrast (about mid-grey 0.5) and saturation (about each pixel's luma)."""
    x = x * brightness
    x = (x - 0.5) * contrast + 0.5
    luma = x @ jnp.array([0.299, 0.587, 0.114], jnp.float32)
    return luma[..., None] + (x - luma[..., None]) * saturation
