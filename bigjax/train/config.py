"""The configuration of one training run (what the experiment CLIs fill from their flags)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

TASKS = {"panda": 6, "camelyon": 2}  # task -> number of classes
SELECT_METRIC = {"panda": "qwk", "camelyon": "auc"}  # validation metric that picks the best checkpoint


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; defaults are the paper's PANDA setting.

    Attributes:
      workdir: checkpoints, metrics.jsonl, curves.png, results.md, features/ (precomputed) go here.
      store: tile store folder (``bigjax.data.tiling.tile_dataset`` output).
      manifest: the store's manifest CSV (default ``<store>/manifest.csv``); its split column picks
        train / val / test slides.
      task: "panda" (6 ISUP grades; QWK, accuracy) or "camelyon" (binary; accuracy, AUC).
      encoder: "big", "inmemory", "frozen" or "precomputed" (see ``bigjax.train.encoders``).
      aggregator: a name of ``bigjax.models.mil.AGGREGATORS``.
      depth, big_stages, max_partition_bytes: the ResNet encoder and its Big-Layers budget.
      init: torchvision/timm ResNet safetensors file; None = random init (a warning says so).
      optimizer, lr, weight_decay, schedule, b1: see ``bigjax.train.optim.make_optimizer``.
      epochs: passes over the training slides (one bag per slide per epoch).
      batch_size: bags whose mean loss makes one gradient (the encoder sees their tiles together).
      accum: gradients averaged into one optimiser update (optax.MultiSteps).
      tiles_per_bag: K tiles drawn per training bag.
      augment: one random augmentation draw per slide and epoch, applied to all its tiles.
      seed: parameters, data order, tile draws and augmentation are functions of it.
      val_draws, val_tiles: validation each epoch = mean over val_draws random bags of val_tiles
        tiles per slide (0 tiles = all tiles).
      eval_draws, eval_tiles: the final test protocol's R repeated random K-tile draws (besides
        all tiles).
      embed_chunk: tiles per jitted eval-mode encoder call.
      checkpoint_every: also save the latest checkpoint every this many steps (0 = epoch ends only).
      log_every: steps between metrics.jsonl rows of the training loss.
      progress: tqdm progress bars.
    """

    workdir: str
    store: str
    manifest: str | None = None
    task: str = "panda"
    encoder: str = "big"
    aggregator: str = "abmil"
    depth: int = 18
    big_stages: int = 4
    max_partition_bytes: int = 256 * 2**20
    init: str | None = None
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    b1: float = 0.9
    epochs: int = 20
    batch_size: int = 2
    accum: int = 16
    tiles_per_bag: int = 256
    augment: bool = True
    seed: int = 0
    val_draws: int = 1
    val_tiles: int = 0
    eval_draws: int = 100
    eval_tiles: int = 256
    embed_chunk: int = 64
    checkpoint_every: int = 0
    log_every: int = 10
    progress: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}: choose one of {', '.join(TASKS)}")
        for name in ("epochs", "batch_size", "accum", "tiles_per_bag", "val_draws", "embed_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def n_classes(self) -> int:
        return TASKS[self.task]

    @property
    def select_metric(self) -> str:
        return SELECT_METRIC[self.task]

    @property
    def manifest_path(self) -> Path:
        return Path(self.manifest) if self.manifest else Path(self.store) / "manifest.csv"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, **overrides) -> "TrainConfig":
        return cls(**{**json.loads(text), **overrides})
