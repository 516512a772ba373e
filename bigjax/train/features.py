"""Tiles to the encoder's input, eval-mode embeddings of tiles, and the cache of precomputed ones.

Tiles arrive as uint8 (N, T, T, 3); ``normalize`` maps them to float32 with the architecture's mean and
std (ImageNet's for ResNets, the model card's for ViTs: ``bigjax.models.arch.normalization``). In eval
mode BatchNorm uses running statistics, so a tile's embedding does not depend on the other tiles of its
batch: ``embed_tiles`` runs any number of tiles in fixed-size chunks (few compiles) through a jittable
eval-mode forward, and ``FeatureCache`` keeps every tile's embedding for the ``precomputed`` mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["normalize", "normalize_host", "embed_tiles", "FeatureCache"]

# (encoder, normalised float32 tiles) -> eval-mode embeddings; jittable, a module-level function
EvalForward = Callable[[nnx.Module, jax.Array], jax.Array]


def normalize(tiles, mean, std) -> jax.Array:
    """uint8 (..., T, T, 3) tiles -> float32, scaled to [0, 1] and standardised by (mean, std)."""
    x = jnp.asarray(tiles).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def normalize_host(tiles: np.ndarray, mean, std) -> np.ndarray:
    """``normalize`` in numpy, for tiles that stay in host memory (the Big-Layers' input)."""
    return ((tiles.astype(np.float32) / 255.0 - np.asarray(mean, np.float32))
            / np.asarray(std, np.float32))


@nnx.jit(static_argnums=(0, 3))
def _embed_chunk(forward: EvalForward, encoder: nnx.Module, tiles: jax.Array, norm) -> jax.Array:
    return forward(encoder, normalize(tiles, *norm))


def embed_tiles(forward: EvalForward, encoder: nnx.Module, tiles: np.ndarray, norm,
                chunk: int = 64) -> jax.Array:
    """Eval-mode embeddings (N, D) of uint8 tiles (N, T, T, 3), at most ``chunk`` tiles per jitted call.

    Args:
      norm: the (mean, std) tiles are standardised with, as tuples (static: part of the compile key).
    Each call's tiles are zero-padded to a power of two (or to ``chunk``), so a few shapes compile.
    """
    out = []
    for start in range(0, len(tiles), chunk):
        part = tiles[start:start + chunk]
        size = min(chunk, 1 << (len(part) - 1).bit_length())
        padded = np.concatenate([part, np.zeros((size - len(part), *part.shape[1:]), part.dtype)])
        out.append(_embed_chunk(forward, encoder, padded, norm)[:len(part)])
    return jnp.concatenate(out) if len(out) > 1 else out[0]


class FeatureCache:
    """Eval-mode embeddings of every tile of every slide, one ``<slide_id>.npy`` (float32 (n, D)) each.

    Beside each, ``<slide_id>.json`` names the store and slide folder it was computed from: a slide
    of another store with the same id (an external test set, ``--eval_manifest``) is computed anew,
    not answered with the training slide's embeddings.

    Args:
      folder: where the ``.npy`` files live (e.g. ``<workdir>/features``).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._loaded: dict[str, np.ndarray] = {}

    def path(self, slide_id: str) -> Path:
        return self.folder / f"{slide_id}.npy"

    def _origin_path(self, slide_id: str) -> Path:
        return self.folder / f"{slide_id}.json"

    @staticmethod
    def _origin(store, row) -> dict:
        return {"store": str(Path(store.root).absolute()), "folder": row.store, "n_tiles": row.n_tiles}

    def _cached(self, store, row) -> bool:
        origin = self._origin_path(row.slide_id)
        return (self.path(row.slide_id).is_file() and origin.is_file()
                and json.loads(origin.read_text()) == self._origin(store, row))

    def _write(self, store, row, feats: np.ndarray) -> None:
        """The embeddings, then their origin: a kill in between leaves no origin (recomputed)."""
        self._origin_path(row.slide_id).unlink(missing_ok=True)
        tmp = self.folder / f".{row.slide_id}.tmp.npy"
        np.save(tmp, feats)
        tmp.rename(self.path(row.slide_id))
        self._origin_path(row.slide_id).write_text(json.dumps(self._origin(store, row)))
        self._loaded.pop(row.slide_id, None)

    def fill(self, embed: Callable[[np.ndarray], jax.Array], store, slides: Sequence,
             progress: bool = True) -> None:
        """Embed every tile of the slides not cached yet (written to a temp name, then renamed).

        Args:
          embed: uint8 tiles (n, T, T, 3) -> eval-mode embeddings (n, D).
        """
        from tqdm import tqdm
        from bigjax.data.bags import eval_chunks

        todo = {row.slide_id: row for row in slides if not self._cached(store, row)}
        if not todo:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        parts: dict[str, list] = {}
        bar = tqdm(total=sum(r.n_tiles for r in todo.values()), desc="precomputing embeddings",
                   unit="tile", disable=not progress)
        for c in eval_chunks(store, list(todo.values()), chunk=4096):
            parts.setdefault(c.slide_id, []).append(np.asarray(embed(c.tiles)))
            bar.update(len(c.tiles))
            if c.start + len(c.tiles) == c.n_tiles:
                self._write(store, todo[c.slide_id], np.concatenate(parts.pop(c.slide_id)))
        bar.close()

    def features(self, slide_id: str, indices=None) -> np.ndarray:
        """The slide's embeddings (all, or rows ``indices``)."""
        if slide_id not in self._loaded:
            self._loaded[slide_id] = np.load(self.path(slide_id))
        feats = self._loaded[slide_id]
        return feats if indices is None else feats[np.asarray(indices)]
