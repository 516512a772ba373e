"""Presets: each task's paper setting and a quick run on generated data, as functions of nothing.

A preset is a ``TrainConfig`` (whose defaults are the paper's PANDA setting) plus how the run's data
set is made; each preset states only where it departs from the defaults. Flags override presets
(``experiments.flags.apply_flags``).
"""

from __future__ import annotations

import dataclasses

from bigjax.train.config import PAPER_OPTIMIZER, TrainConfig

__all__ = ["Preset", "panda_paper", "panda_quick", "camelyon_paper", "camelyon_quick"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A run before its flags: the training config and how its tiles are made.

    Attributes:
      train: the run's configuration.
      tile_size: tile side in pixels when tiling slides into the store.
      mpp: microns per pixel to tile at (None: the slide's base level).
      n_slides, side: size of the generated PANDA-like data set (runs without real data).
    """

    train: TrainConfig
    tile_size: int = 256
    mpp: float | None = None
    n_slides: int = 96
    side: tuple[int, int] = (384, 640)


def _workdir(name: str) -> dict:
    return {"workdir": f"runs/{name}", "store": f"runs/{name}/store"}


def panda_paper() -> Preset:
    """The paper's PANDA setting (real data): 256 px tiles, every default of ``TrainConfig``."""
    return Preset(TrainConfig(**_workdir("panda_real")))


def panda_quick() -> Preset:
    """Generated PANDA-like slides, sized to finish in about 5 minutes on a 2-core CPU.

    32 px tiles, 8-tile bags, 4 bags per step (BatchNorm statistics then span slides, not one slide's
    tiles), ResNet-18 with 2 big stages under a 1.5 MiB partition budget, 5 epochs, Adam 1e-3.
    """
    train = TrainConfig(**_workdir("panda"), big_stages=2, max_partition_bytes=3 * 2**19,
                        optim=dataclasses.replace(PAPER_OPTIMIZER, lr=1e-3, accum=1), epochs=5,
                        batch_size=4, tiles_per_bag=8, eval_draws=20, eval_tiles=8, val_draws=4,
                        val_tiles=8, embed_chunk=128)
    return Preset(train, tile_size=32)


# CAMELYON: DEMON Adam at a constant 5e-5 without weight decay
def _camelyon_optimizer(lr: float):
    return dataclasses.replace(PAPER_OPTIMIZER, name="demon_adam", lr=lr, weight_decay=0.0,
                               schedule="constant")


def camelyon_paper() -> Preset:
    """The paper's CAMELYON setting: 256 px tiles at 0.5 µm/px, 512-tile bags, 10 draws of 2048."""
    train = TrainConfig(**_workdir("camelyon_real"), task="camelyon",
                        optim=_camelyon_optimizer(5e-5), tiles_per_bag=512, eval_draws=10,
                        eval_tiles=2048)
    return Preset(train, mpp=0.5)


def camelyon_quick() -> Preset:
    """The generated stand-in (PANDA-like slides made binary) with the quick PANDA sizes."""
    quick = panda_quick()
    train = dataclasses.replace(quick.train, **_workdir("camelyon"), task="camelyon",
                                optim=dataclasses.replace(_camelyon_optimizer(1e-3), accum=1))
    return dataclasses.replace(quick, train=train)
