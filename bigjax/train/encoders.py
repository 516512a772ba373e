"""The four encoder modes of a training run, and the eval-mode embedding of tiles.

- ``big``: ``BigResNet`` trained end to end; its forward/backward run eagerly (Big-Layers), the
  aggregator and the loss on the compute device, gradients by ``nnx.grad`` over both.
- ``inmemory``: the plain ``ResNet`` trained end to end, the whole step jitted (for what fits).
- ``frozen``: the encoder's eval-mode forward on the fly (augmented tiles), only the aggregator trained.
- ``precomputed``: eval-mode embeddings of every tile computed once into a cache (``FeatureCache``),
  only the aggregator trained, on cached rows.

Tiles arrive as uint8 (N, T, T, 3); ``normalize`` maps them to float32 with ImageNet mean/std.
In eval mode BatchNorm uses running statistics, so a tile's embedding does not depend on the other
tiles of its batch: ``embed_tiles`` runs any number of tiles in fixed-size chunks (one compile) with
the in-memory path of the same parameters, whatever the encoder class.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.models.resnet import BigResNet, ResNet, load_torchvision

log = logging.getLogger(__name__)

MODES = ("big", "inmemory", "frozen", "precomputed")
TRAINS_ENCODER = {"big": True, "inmemory": True, "frozen": False, "precomputed": False}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def build_encoder(mode: str, *, depth: int, big_stages: int, max_partition_bytes: int,
                  init: str | None, seed: int) -> ResNet:
    """The encoder of ``mode``: a ``BigResNet`` for ``big``, else a plain ``ResNet``.

    Args:
      init: a torchvision/timm ResNet ``.safetensors`` file; None = random init (warned about).
      seed: the parameter seed of a random init.
    """
    if mode not in MODES:
        raise ValueError(f"encoder mode {mode!r}: choose one of {', '.join(MODES)}")
    rngs = nnx.Rngs(seed)
    if mode == "big":
        encoder = BigResNet(depth, big_stages=big_stages, max_partition_bytes=max_partition_bytes,
                            rngs=rngs)
    else:
        encoder = ResNet(depth, rngs=rngs)
    if init:
        load_torchvision(encoder, init)
        log.info("encoder ResNet-%d initialised from %s", depth, init)
    else:
        log.warning("encoder ResNet-%d has random initial weights (no --init); the paper starts "
                    "from ImageNet weights", depth)
    return encoder


def normalize(tiles) -> jax.Array:
    """uint8 (..., T, T, 3) tiles -> float32, scaled to [0, 1] and standardised by ImageNet mean/std."""
    x = jnp.asarray(tiles).astype(jnp.float32) / 255.0
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def normalize_host(tiles: np.ndarray) -> np.ndarray:
    """``normalize`` in numpy, for tiles that stay in host memory (the Big-Layers' input)."""
    return (tiles.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


@nnx.jit
def _embed_chunk(encoder: ResNet, tiles: jax.Array) -> jax.Array:
    # ResNet.__call__ on a BigResNet too: the in-memory path of the same parameters, jittable
    return ResNet.__call__(encoder, normalize(tiles), train=False)


def embed_tiles(encoder: ResNet, tiles: np.ndarray, chunk: int = 64) -> jax.Array:
    """Eval-mode embeddings (N, D) of uint8 tiles (N, T, T, 3), at most ``chunk`` tiles per jitted call.

    Each call's tiles are zero-padded to a power of two (or to ``chunk``), so a few shapes compile.
    """
    out = []
    for start in range(0, len(tiles), chunk):
        part = tiles[start:start + chunk]
        size = min(chunk, 1 << (len(part) - 1).bit_length())
        padded = np.concatenate([part, np.zeros((size - len(part), *part.shape[1:]), part.dtype)])
        out.append(_embed_chunk(encoder, padded)[:len(part)])
    return jnp.concatenate(out) if len(out) > 1 else out[0]


class FeatureCache:
    """Eval-mode embeddings of every tile of every slide, one ``<slide_id>.npy`` (float32 (n, D)) each.

    Args:
      folder: where the ``.npy`` files live (e.g. ``<workdir>/features``).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._loaded: dict[str, np.ndarray] = {}

    def path(self, slide_id: str) -> Path:
        return self.folder / f"{slide_id}.npy"

    def fill(self, encoder: ResNet, store, slides: Sequence, chunk: int = 64,
             progress: bool = True) -> None:
        """Embed every tile of the slides not cached yet (written to a temp name, then renamed)."""
        from tqdm import tqdm
        from bigjax.data.bags import eval_chunks

        todo = [row for row in slides if not self.path(row.slide_id).is_file()]
        if not todo:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        parts: dict[str, list] = {}
        bar = tqdm(total=sum(r.n_tiles for r in todo), desc="precomputing embeddings", unit="tile",
                   disable=not progress)
        for c in eval_chunks(store, todo, chunk=4096):
            parts.setdefault(c.slide_id, []).append(np.asarray(embed_tiles(encoder, c.tiles, chunk)))
            bar.update(len(c.tiles))
            if c.start + len(c.tiles) == c.n_tiles:
                tmp = self.folder / f".{c.slide_id}.tmp.npy"
                np.save(tmp, np.concatenate(parts.pop(c.slide_id)))
                tmp.rename(self.path(c.slide_id))
        bar.close()

    def features(self, slide_id: str, indices=None) -> np.ndarray:
        """The slide's embeddings (all, or rows ``indices``)."""
        if slide_id not in self._loaded:
            self._loaded[slide_id] = np.load(self.path(slide_id))
        feats = self._loaded[slide_id]
        return feats if indices is None else feats[np.asarray(indices)]
