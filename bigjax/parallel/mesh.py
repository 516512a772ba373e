"""The encoder mesh: one axis of devices, a slide's tiles spread over it, padded and masked.

Campanella et al. ("Beyond MIL") spread one slide's tiles over N encoder GPUs. Here the devices form a
1-D mesh whose axis is ``AXIS``; the encoder is replicated and the tiles are split over the axis with
``np.array_split`` (shard sizes differ by at most one, in slide order). Every shard is padded to the
same ``per_shard`` rows so that ``shard_map`` sees equal blocks; ``mask`` marks the real tiles, and
``index`` says where each tile sits in the padded array, so no tile is dropped and no padding reaches
the aggregator or the BatchNorm statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["AXIS", "encoder_mesh", "ShardLayout", "to_mesh", "replicate", "local"]

AXIS = "encoders"


def encoder_mesh(devices: Sequence[jax.Device] | int | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (all of ``jax.devices()``, or the first ``n``) with axis ``AXIS``.

    In a multi-process run ``jax.devices()`` lists every process's devices: the mesh spans them all.
    """
    if devices is None or isinstance(devices, int):
        available = jax.devices()
        n = len(available) if devices is None else devices
        if not 1 <= n <= len(available):
            raise ValueError(f"an encoder mesh of {n} devices: this run has {len(available)} "
                             f"({available[0].platform}); on a CPU set jax_num_cpu_devices first")
        devices = available[:n]
    return Mesh(np.array(list(devices)), (AXIS,))


@dataclass(frozen=True)
class ShardLayout:
    """Where each of a slide's ``n_tiles`` tiles lives on ``n_shards`` equal, padded shards.

    Attributes:
      n_tiles, n_shards: the slide's tile count and the mesh size.
      per_shard: rows per shard, ``ceil(n_tiles / n_shards)``.
      sizes: real tiles per shard (``np.array_split`` sizes).
    """

    n_tiles: int
    n_shards: int

    def __post_init__(self):
        if self.n_tiles < 1 or self.n_shards < 1:
            raise ValueError(f"a layout needs at least one tile and one shard, got {self.n_tiles} "
                             f"tiles on {self.n_shards} shards")

    @property
    def per_shard(self) -> int:
        return -(-self.n_tiles // self.n_shards)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(s) for s in np.array_split(np.arange(self.n_tiles), self.n_shards))

    @property
    def index(self) -> np.ndarray:
        """Row of each tile (in slide order) in the padded (n_shards * per_shard) array."""
        return np.concatenate([k * self.per_shard + np.arange(size)
                               for k, size in enumerate(self.sizes)])

    @property
    def mask(self) -> np.ndarray:
        """float32 (n_shards * per_shard,): 1 for a real tile, 0 for padding."""
        mask = np.zeros(self.n_shards * self.per_shard, np.float32)
        mask[self.index] = 1.0
        return mask

    def pad(self, tiles) -> np.ndarray:
        """(n_tiles, ...) -> (n_shards * per_shard, ...) with zero rows as padding."""
        tiles = np.asarray(tiles)
        if len(tiles) != self.n_tiles:
            raise ValueError(f"layout for {self.n_tiles} tiles was given {len(tiles)}")
        padded = np.zeros((self.n_shards * self.per_shard, *tiles.shape[1:]), tiles.dtype)
        padded[self.index] = tiles
        return padded

    def split(self, tiles) -> list:
        """The real tiles of each shard, unpadded (for engines that run eagerly, one per device)."""
        bounds = np.cumsum((0,) + self.sizes)
        return [tiles[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def to_mesh(x, mesh: Mesh, spec: P = P()) -> jax.Array:
    """A global array of host value ``x`` laid out on ``mesh`` by ``spec`` (replicated by default).

    Built from per-device slices (``make_array_from_callback``), so it works in a multi-process run
    where each process holds the same ``x`` and owns only its own devices.
    """
    sharding = NamedSharding(mesh, spec)
    if isinstance(x, jax.Array) and x.sharding == sharding:  # e.g. state the last step returned
        return x
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


def replicate(tree, mesh: Mesh):
    """``to_mesh`` of every leaf of ``tree`` (model state), PRNG keys included (through their data)."""
    def put(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(to_mesh(jax.random.key_data(leaf), mesh),
                                            impl=jax.random.key_impl(leaf))
        return to_mesh(leaf, mesh)
    return jax.tree.map(put, tree)


def local(tree):
    """This process's copy (its first device's) of every replicated global array of ``tree``.

    What the mesh step returns spans every process's devices; the model, the optimiser and the
    checkpoints of a run live on one device per process, and their values are these copies.
    """
    return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)
