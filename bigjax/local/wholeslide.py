"""Whole-slide local training (Zhang et al.): one entire slide per step, streamed through Big-Layers.

Each slide is read at a target resolution (2 µm/px, "5×", by default: the pyramid level closest to it,
``bigjax.data.slides.pick_level``), cropped to the bounding box of its tissue (the PANDA rule per
pixel: greyscale in [3, 230]), padded with background to a multiple of ``pad`` pixels (fewer shapes
to compile), and trained on as one image: ``local_resnet34``'s K modules, each step
``train_step`` with every module's Big-Layers running under the run's ``Execution``, so the slide's
activations stay in host memory and the device holds one partition at a time. Each module has its own
AdamW (``make_optimizers``: lr 1e-5 for the backbone, 2e-5 for the heads, gradient accumulation 8);
the weight decay is the official code's 1e-2 (options.py and its README command; the issue's 1e-6 is
not in the code). Slides are flipped at random (the official trainer also crops edges, rotates and
jitters colour). After the last epoch the validation and test slides are classified by H.

References:
    Zhang et al., MICCAI 2022; official code cvlab-stonybrook/local_learning_wsi (main.py, trainer.py,
    options.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from bigjax.data.layouts import SlideEntry
from bigjax.data.slides import PANDA_GREY_RANGE, greyscale, open_slide, pick_level
from bigjax.layers.execution import DEFAULT_PARTITION_BYTES, Execution
from bigjax.local.model import local_resnet34
from bigjax.local.step import make_optimizers, paths_for, train_step
from bigjax.metrics import accuracy, quadratic_weighted_kappa
from bigjax.models.arch import IMAGENET
from bigjax.models.resnet import ResNet, load_torchvision
from bigjax.train.features import normalize_host

log = logging.getLogger(__name__)

__all__ = ["WholeSlideConfig", "tissue_box", "read_slide", "train_wholeslide"]

BACKGROUND = 255


@dataclasses.dataclass(frozen=True)
class WholeSlideConfig:
    """A whole-slide local run; defaults are the official code's (options.py, README command).

    Attributes:
      workdir: metrics.jsonl and results.json go here.
      n_classes: slide classes (6 ISUP grades for PANDA).
      mpp: µm per pixel to read slides at (2.0 = 5× for 0.5 µm/px at 20×).
      modules: K (1, 2, 4 or 8; 1 is end-to-end).
      alpha: weight of the RFR loss.
      n_patches: RFR patches per module and step (10).
      epochs: passes over the training slides.
      accum: slides per optimiser update.
      lr_backbone, lr_heads, weight_decay: the AdamW settings.
      max_partition_bytes: the Big-Layers partition budget.
      pad: slides are padded to a multiple of this many pixels.
      init: torchvision ResNet-34 .safetensors (None: random init).
      seed: parameters, slide order, flips and RFR patches.
    """

    workdir: str
    n_classes: int = 6
    mpp: float = 2.0
    modules: int = 4
    alpha: float = 1.0
    n_patches: int = 10
    epochs: int = 55
    accum: int = 8
    lr_backbone: float = 1e-5
    lr_heads: float = 2e-5
    weight_decay: float = 1e-2
    max_partition_bytes: int = DEFAULT_PARTITION_BYTES
    pad: int = 128
    init: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.modules not in (1, 2, 4, 8):
            raise ValueError(f"--modules={self.modules}: must divide the 8 pieces (1, 2, 4 or 8)")
        for name in ("epochs", "accum", "pad", "max_partition_bytes", "n_classes", "n_patches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)}: must be at least 1")
        if not self.mpp > 0:
            raise ValueError(f"--mpp={self.mpp}: must be positive (µm per pixel)")


def tissue_box(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pixels that are tissue by the PANDA rule; all if none."""
    grey = greyscale(rgb)
    tissue = (grey >= PANDA_GREY_RANGE[0]) & (grey <= PANDA_GREY_RANGE[1])
    rows, cols = np.flatnonzero(tissue.any(axis=1)), np.flatnonzero(tissue.any(axis=0))
    if len(rows) == 0:
        return 0, rgb.shape[0], 0, rgb.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def read_slide(path, mpp: float, pad: int = 1) -> np.ndarray:
    """uint8 (H, W, 3): the slide's level closest to ``mpp``, cropped to its tissue, padded to ``pad``."""
    with open_slide(path) as slide:
        level = pick_level(slide.levels, mpp)
        h, w = slide.levels[level].shape
        rgb = slide.read_region(level, 0, 0, h, w)
    top, bottom, left, right = tissue_box(rgb)
    rgb = rgb[top:bottom, left:right]
    out = np.full((-(-rgb.shape[0] // pad) * pad, -(-rgb.shape[1] // pad) * pad, 3), BACKGROUND,
                  np.uint8)
    out[:rgb.shape[0], :rgb.shape[1]] = rgb
    return out


def _image(rgb: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Normalised float32 (1, H, W, 3) in host memory; flipped at random when ``rng`` is given."""
    if rng is not None:
        rgb = rgb[::-1] if rng.random() < 0.5 else rgb
        rgb = rgb[:, ::-1] if rng.random() < 0.5 else rgb
    return normalize_host(np.ascontiguousarray(rgb)[None], *IMAGENET)


def build_network(config: WholeSlideConfig):
    """``local_resnet34`` (stem stride 3) from ``config.init`` or a random ResNet-34."""
    resnet = ResNet(34, rngs=nnx.Rngs(config.seed))
    if config.init:
        load_torchvision(resnet, config.init)
    else:
        log.warning("ResNet-34 has random initial weights (no --init); Zhang et al. start from "
                    "ImageNet weights")
    return local_resnet34(config.modules, config.n_classes, resnet=resnet, alpha=config.alpha,
                          n_patches=config.n_patches, rngs=nnx.Rngs(config.seed + 1))


def train_wholeslide(config: WholeSlideConfig, slides: Sequence[SlideEntry],
                     progress: bool = True) -> dict:
    """Train on the "train" slides, then classify "val" and "test"; writes results.json.

    Returns:
      {"val"/"test": {"accuracy", "qwk", "n"}, "losses": last epoch's mean L_1..L_K, "seconds_per_slide",
       "largest_slide": (H, W)}.
    """
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train = [s for s in slides if s.split == "train"]
    if not train:
        raise ValueError("no training slides (split 'train') in the layout")
    net = build_network(config)
    optimizers = make_optimizers(net, lr_backbone=config.lr_backbone, lr_heads=config.lr_heads,
                                 weight_decay=config.weight_decay, accum=config.accum)
    execution = Execution(config.max_partition_bytes)
    rng = np.random.default_rng(config.seed)
    images = {s.slide_id: read_slide(s.path, config.mpp, config.pad) for s in slides}
    metrics, seconds, losses = open(workdir / "metrics.jsonl", "w"), [], []
    for epoch in range(config.epochs):
        losses = []
        for n, k in enumerate(rng.permutation(len(train))):
            slide = train[k]
            start = time.perf_counter()
            step_losses = [float(v) for v in train_step(net, optimizers, _image(images[slide.slide_id], rng),
                                                        slide.label, rng, execution=execution)]
            seconds.append(time.perf_counter() - start)
            losses.append(step_losses)
            metrics.write(json.dumps(dict(kind="step", epoch=epoch, slide=slide.slide_id,
                                          shape=images[slide.slide_id].shape[:2], losses=step_losses,
                                          seconds=seconds[-1])) + "\n")
            metrics.flush()
            if progress:
                log.info("epoch %d slide %d/%d: losses %s (%.1f s)", epoch + 1, n + 1, len(train),
                         " ".join(f"{v:.3f}" for v in step_losses), seconds[-1])
        log.info("epoch %d: mean losses %s", epoch + 1,
                 " ".join(f"{v:.3f}" for v in np.mean(losses, axis=0)))
    metrics.close()
    results = {split: _classify(net, [s for s in slides if s.split == split], images, execution,
                                config.n_classes) for split in ("val", "test")}
    results.update(losses=np.mean(losses, axis=0).tolist(),
                   seconds_per_slide=float(np.median(seconds)),
                   largest_slide=max((im.shape[:2] for im in images.values()),
                                     key=lambda s: s[0] * s[1]),
                   config=dataclasses.asdict(config))
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _classify(net, slides, images, execution, n_classes) -> dict:
    """H's accuracy and QWK on ``slides`` (eval mode, one slide at a time, through Big-Layers)."""
    if not slides:
        return {"n": 0}
    paths = paths_for(execution, len(net.local_modules))
    preds = [int(np.argmax(jax.device_get(net.predict(paths, _image(images[s.slide_id])))))
             for s in slides]
    labels = [s.label for s in slides]
    return {"n": len(slides), "accuracy": accuracy(labels, preds, n_classes),
            "qwk": quadratic_weighted_kappa(labels, preds, n_classes)}
