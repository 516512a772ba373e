"""Whole-slide local training (Zhang et al.): one entire slide per step, streamed through Big-Layers.

Each slide is read at a target resolution (2 µm/px, "5×", by default: the pyramid level closest to it,
``bigjax.data.slides.pick_level``), cropped to the bounding box of its tissue (the PANDA rule per pixel:
greyscale in [3, 230]), padded with background to a multiple of ``pad`` pixels (fewer shapes to
compile), and trained on as one image, never resident whole on the Big path (a tensorstore array whose
row bands are decoded from the slide as the stem's conv reads them, ``data.slide_array``; the tissue
boxes are found once per slide file and remembered in the workdir, ``data.tissue_boxes``):
``local_resnet34``'s K modules, each step ``train_step`` with every module's Big-Layers running under
the run's ``Execution``, so the slide's activations stay in host memory and the device holds one
partition at a time. Each module has its own AdamW (``make_optimizers``: lr 1e-5 for the backbone, 2e-5
for the heads, gradient accumulation 8); the weight decay is the official code's 1e-2 (options.py and
its README command; the issue's 1e-6 is not in the code), and the learning rates drop 10 times at epochs
25, 35 and 45 (the official ``MultiStepLR`` in its README command). Slides are flipped at random (the
official trainer also crops edges, rotates and jitters colour). After every epoch H classifies the
validation slides and the checkpoint is kept (``run_state``: the latest, and the best by validation QWK,
in one atomic commit; ``resume=True`` continues a run and takes the steps it would have taken). At the
end the best checkpoint classifies the validation and test slides, with 95 % bootstrap intervals over
slides, and every head's QWK is reported beside H's (which modules' features already tell the grade).

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
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from bigjax import lock
from bigjax.bench.memory import PhasePeaks
from bigjax.data.layouts import SlideEntry
from bigjax.data.slide_array import SlideImage, as_array, read_whole
from bigjax.data.tissue_boxes import CACHE_NAME, locate_all
from bigjax.errors import Interrupted
from bigjax.host_memory import SpillMeter, parse_host_memory, spill_options
from bigjax.layers.execution import DEFAULT_PARTITION_BYTES, Execution
from bigjax.local.group_norm import NORMS, to_group_norm
from bigjax.local.model import LocalNetwork, local_resnet34
from bigjax.local.run_state import TrainingState
from bigjax.local.step import decay_updates, make_optimizers, paths_for, train_step
from bigjax.metrics import bootstrap_ci
from bigjax.models.arch import IMAGENET
from bigjax.models.resnet import ResNet, load_torchvision
from bigjax.train.evaluate import score
from bigjax.train.loop import improves

log = logging.getLogger(__name__)

__all__ = ["WholeSlideConfig", "train_wholeslide"]


@dataclasses.dataclass(frozen=True)
class WholeSlideConfig:
    """A whole-slide local run; defaults are the official code's (options.py, README command).

    Attributes:
      workdir: metrics.jsonl and results.json go here.
      n_classes: slide classes (6 ISUP grades for PANDA).
      mpp: µm per pixel to read slides at (2.0 = 5× for 0.5 µm/px at 20×).
      modules: K (1, 2, 4 or 8; 1 is end-to-end).
      alpha: weight of the RFR loss.
      norm: "batch" (the backbone's BatchNorm frozen, ``Resnet34LocalBatchNorm``) or "group" (every
        backbone BatchNorm made GroupNorm(C, C), ``Resnet34Local``; ``bigjax.local.group_norm``).
      n_patches: RFR patches per module and step (10).
      head_kernel: side and stride of H's reducing conv (the official 5; a smaller one leaves H
        more positions on a small slide).
      epochs: passes over the training slides.
      accum: slides per optimiser update.
      lr_backbone, lr_heads, weight_decay: the AdamW settings.
      decay_epochs: 0-based epochs from which the learning rates are 10 times smaller (the
        official README command's ``--decay-multi-epochs 25,35,45``; ``MultiStepLR``).
      checkpoint_every: also save the latest checkpoint every this many slides (0: at the end of
        each epoch only, and on Ctrl-C).
      max_partition_bytes: the Big-Layers partition budget.
      host_memory: bytes of host RAM the Big-Layers may keep activations in, beyond which they spill
        to ``spill_dir`` (``Execution.host_memory``), or "auto" (``bigjax.host_memory``); None =
        all in RAM.
      spill_dir: the spill store's folder (default ``<workdir>/spill``).
      in_memory: run every module in memory, jitted, instead of through Big-Layers (slides that
        fit on the device; the tests' tiny runs).
      pad: slides are padded to a multiple of this many pixels.
      init: torchvision ResNet-34 .safetensors (None: random init).
      n_boot: bootstrap resamples of the final metrics' 95 % intervals.
      seed: parameters, slide order, flips and RFR patches.
    """

    workdir: str
    n_classes: int = 6
    mpp: float = 2.0
    modules: int = 4
    alpha: float = 1.0
    norm: str = "batch"
    n_patches: int = 10
    head_kernel: int = 5
    epochs: int = 55
    accum: int = 8
    lr_backbone: float = 1e-5
    lr_heads: float = 2e-5
    weight_decay: float = 1e-2
    decay_epochs: tuple[int, ...] = (25, 35, 45)
    checkpoint_every: int = 0
    max_partition_bytes: int = DEFAULT_PARTITION_BYTES
    host_memory: int | str | None = None
    spill_dir: str | None = None
    in_memory: bool = False
    pad: int = 128
    init: str | None = None
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.modules not in (1, 2, 4, 8):
            raise ValueError(f"--modules={self.modules}: must divide the 8 pieces (1, 2, 4 or 8)")
        for name in ("epochs", "accum", "pad", "max_partition_bytes", "n_classes", "n_patches", "n_boot",
                     "head_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)}: must be at least 1")
        if self.norm not in NORMS:
            raise ValueError(f"--norm={self.norm}: choose one of {', '.join(NORMS)}")
        if self.checkpoint_every < 0 or any(e < 0 for e in self.decay_epochs):
            raise ValueError(f"--checkpoint_every={self.checkpoint_every}, --decay_epochs="
                             f"{','.join(map(str, self.decay_epochs))}: must be >= 0")
        if not self.mpp > 0:
            raise ValueError(f"--mpp={self.mpp}: must be positive (µm per pixel)")
        object.__setattr__(self, "host_memory", parse_host_memory(self.host_memory))
        spill_options(self.host_memory, self.spill_dir, self.workdir)  # spill_dir alone is refused
        if self.in_memory and self.host_memory is not None:
            raise ValueError(f"--host_memory={self.host_memory} has no effect in memory (in_memory): "
                             "only the Big-Layers keep activations in host RAM")


def _input(image: SlideImage, execution: Execution | None, rng: np.random.Generator | None = None):
    """Slide ``image`` normalised, (1, H, W, 3) float32, flipped at random when ``rng`` is given: a
    tensorstore array read band by band on the Big path, one host array in memory."""
    flips = (rng.random() < 0.5, rng.random() < 0.5) if rng is not None else (False, False)
    return (read_whole if execution is None else as_array)(image, IMAGENET, flips)


def build_network(config: WholeSlideConfig):
    """``local_resnet34`` (stem stride 3) from ``config.init`` or a random ResNet-34, with
    ``config.norm``."""
    resnet = ResNet(34, rngs=nnx.Rngs(config.seed))
    if config.init:
        load_torchvision(resnet, config.init)
    else:
        log.warning("ResNet-34 has random initial weights (no --init); Zhang et al. start from "
                    "ImageNet weights")
    if config.norm == "group":
        to_group_norm(resnet)  # the backbone only: the RFR decoders keep BatchNorm, as the official
    return local_resnet34(config.modules, config.n_classes, resnet=resnet, alpha=config.alpha,
                          n_patches=config.n_patches, final_kernel=config.head_kernel,
                          rngs=nnx.Rngs(config.seed + 1))


def train_wholeslide(config: WholeSlideConfig, slides: Sequence[SlideEntry], *, resume: bool = False,
                     progress: bool = True, network: LocalNetwork | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     on_step: Callable[[int], None] | None = None) -> dict:
    """Train on the "train" slides, validate every epoch, then classify "val" and "test" with the best.

    Args:
      config: the run.
      slides: the layout (``split`` "train", "val", "test").
      resume: continue from the workdir's latest checkpoint (else it must hold none).
      progress: a log line per slide.
      network: the network to train (default ``build_network(config)``; tests give a tiny one).
      should_stop: polled after every slide; True saves the latest checkpoint and raises
        ``Interrupted`` (the CLI passes Ctrl-C's request).
      on_step: called with the run's slide count after every slide (tests simulate a kill).
    Returns:
      {"val"/"test": {"n", "accuracy", "qwk", their "..._ci95", "probs", "labels", "heads_qwk":
      A_1 … A_{K−1} and H's {"qwk", "qwk_ci95"}}, "losses": the last
      epoch's mean L_1..L_K, "best_epoch", "seconds_per_slide", "largest_slide": (H, W),
      "host_memory": the run's bytes spilled ("spill_written", "spill_read"), "disk_gb_s" (those
      bytes over the run's wall-clock seconds), "spill_wait_s" (seconds blocked on the disk) and
      "peak_rss" (also in every epoch's metrics.jsonl row, for that epoch)}; also written to
      results.json.
    """
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    split = {name: [s for s in slides if s.split == name] for name in ("train", "val", "test")}
    train = split["train"]
    if not train:
        raise ValueError("no training slides (split 'train') in the layout")
    with lock.hold(workdir / lock.RUN_LOCK, "a training run"):  # one run per workdir
        net = network or build_network(config)
        optimizers = make_optimizers(net, lr_backbone=config.lr_backbone, lr_heads=config.lr_heads,
                                     weight_decay=config.weight_decay, accum=config.accum,
                                     decay_at=decay_updates(config.decay_epochs, len(train), config.accum))
        state = TrainingState(workdir, net, nnx.List(optimizers))
        meta = state.start(config, resume)
        meter, peaks = SpillMeter(), PhasePeaks()
        execution = None if config.in_memory else Execution(
            config.max_partition_bytes, observer=meter,
            **spill_options(config.host_memory, config.spill_dir, config.workdir))
        boxes = locate_all([s.path for s in slides], config.mpp, config.pad, workdir / CACHE_NAME)
        images = {s.slide_id: image for s, image in zip(slides, boxes)}  # no pixels
        for epoch in range(meta["epoch"], config.epochs):
            order = np.random.default_rng([config.seed, epoch]).permutation(len(train))
            for n in range(meta["slide"], len(train)):
                slide = train[order[n]]
                rng = np.random.default_rng([config.seed, epoch, n])  # flips, RFR patches
                start = time.perf_counter()
                with peaks.phase("training"):
                    x = _input(images[slide.slide_id], execution, rng)
                    losses = [float(v) for v in train_step(net, optimizers, x, slide.label, rng,
                                                           execution=execution)]
                meta.update(step=meta["step"] + 1, slide=n + 1, losses=meta["losses"] + [losses])
                state.log(kind="step", step=meta["step"], epoch=epoch, slide=slide.slide_id,
                          shape=images[slide.slide_id].shape, losses=losses,
                          seconds=time.perf_counter() - start)
                if progress:
                    log.info("epoch %d slide %d/%d: losses %s (%.1f s)", epoch + 1, n + 1, len(train),
                             " ".join(f"{v:.3f}" for v in losses), time.perf_counter() - start)
                if config.checkpoint_every and meta["step"] % config.checkpoint_every == 0:
                    state.save(meta)
                if on_step is not None:
                    on_step(meta["step"])
                if should_stop is not None and should_stop():
                    state.save(meta)
                    raise Interrupted(f"stopped after slide {meta['step']}; the checkpoint is in "
                                      f"{state.checkpoints.directory}: continue with --resume")
            with peaks.phase("evaluation"):
                val = _classify(net, split["val"], images, execution, config.n_classes)
            _end_epoch(state, meta, epoch, val, _host_use(meter.take(), peaks))
        return _final(state, config, split, images, execution, meter, peaks)


def _host_use(spill: dict, peaks: PhasePeaks) -> dict:
    """Bytes spilled (written, read), disk GB/s, and the process's peak RSS so far (VmHWM) in the
    training steps and in evaluation apart (``peak_rss``: the larger)."""
    phases = {f"peak_rss_{name}": peak for name, peak in peaks.peaks.items()}
    return dict(spill, peak_rss=max(phases.values(), default=0), **phases)


def _host_line(use: dict) -> str:
    gib = lambda n: f"{(n or 0) / 2**30:.2f} GiB"  # noqa: E731
    peaks = ", ".join(f"{gib(use[f'peak_rss_{phase}'])} {phase}" for phase in ("training", "evaluation")
                      if f"peak_rss_{phase}" in use)
    return (f"spilled {gib(use['spill_written'])} written, {gib(use['spill_read'])} read, "
            f"{use['disk_gb_s']:.2f} GB/s achieved, {use['spill_wait_s']:.1f} s waited on the "
            f"disk; peak RSS {peaks}")


def _end_epoch(state: "TrainingState", meta: dict, epoch: int, val: dict, host_use: dict) -> None:
    """The epoch's mean losses, validation and host memory; its checkpoint, the best by validation QWK."""
    losses = np.mean(meta["losses"], axis=0).tolist()
    value = val["qwk"] if val["n"] else -losses[-1]  # no val slides: the lowest L_K
    best = meta["best"] is None or improves(value, meta["best"])
    if best:
        meta.update(best=value, best_epoch=epoch + 1)
    meta.update(epoch=epoch + 1, slide=0, losses=[], last_losses=losses)
    state.log(kind="epoch", step=meta["step"], epoch=epoch + 1, losses=losses, **host_use,
              **{f"val_{k}": v for k, v in val.items() if k in ("qwk", "accuracy")})
    state.save(meta, best=best)  # after the row: a resume from before it drops the row
    log.info("epoch %d: mean losses %s; val %s", epoch + 1, " ".join(f"{v:.3f}" for v in losses),
             ", ".join(f"{k} {v:.3f}" for k, v in val.items() if k in ("qwk", "accuracy")) or "none")
    log.info("epoch %d: %s", epoch + 1, _host_line(host_use))


def _final(state: "TrainingState", config: WholeSlideConfig, split: dict, images: dict,
           execution: Execution | None, meter: SpillMeter, peaks: PhasePeaks) -> dict:
    """Restore the best checkpoint, classify val and test (with bootstrap intervals), write results.json
    (with the run's host memory: bytes spilled, disk GB/s, peak RSS)."""
    meta = state.checkpoints.restore_best(state.net)
    with peaks.phase("evaluation"):
        results = {name: _classify_every_head(state.net, split[name], images, execution,
                                              config.n_classes, config.n_boot)
                   for name in ("val", "test")}
    rows = state.rows()
    seconds = [row["seconds"] for row in rows if row["kind"] == "step"]
    results.update(losses=[row for row in rows if row["kind"] == "epoch"][-1]["losses"],
                   best_epoch=meta["best_epoch"],
                   seconds_per_slide=float(np.median(seconds)) if seconds else None,
                   largest_slide=max((im.shape for im in images.values()),
                                     key=lambda s: s[0] * s[1]),
                   config=dataclasses.asdict(config), host_memory=_host_use(meter.total(), peaks))
    log.info("run: %s", _host_line(results["host_memory"]))
    (Path(config.workdir) / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _classify(net, slides, images, execution, n_classes, n_boot: int = 0) -> dict:
    """H's accuracy and QWK on ``slides`` (eval mode, one slide at a time, through Big-Layers);
    with ``n_boot`` also their 95 % bootstrap intervals over slides and each slide's probabilities."""
    if not slides:
        return {"n": 0}
    probs = np.stack([np.asarray(jax.device_get(_probabilities(net, execution,
                                                               _input(images[s.slide_id], execution))))
                      for s in slides])
    return _scores(np.array([s.label for s in slides]), probs, n_classes, n_boot)


def _classify_every_head(net: LocalNetwork, slides, images, execution, n_classes: int,
                         n_boot: int) -> dict:
    """``_classify``'s figures of H, and under "heads_qwk" the QWK of every head, A_1 … A_{K−1} then
    H (``LocalNetwork.head_logits``), each {"qwk", "qwk_ci95"}: one pass over each slide gives all."""
    if not slides:
        return {"n": 0, "heads_qwk": []}
    probs = np.stack([[np.asarray(jax.device_get(p)) for p in
                       _head_probabilities(net, execution, _input(images[s.slide_id], execution))]
                      for s in slides])  # (slides, heads, classes)
    labels = np.array([s.label for s in slides])
    qwk = lambda y, p: score("qwk", y, p, n_classes)  # noqa: E731
    out = _scores(labels, probs[:, -1], n_classes, n_boot)
    out["heads_qwk"] = [{"qwk": qwk(labels, p),
                         "qwk_ci95": bootstrap_ci(qwk, labels, p, n_boot=n_boot) if n_boot else None}
                        for p in probs.transpose(1, 0, 2)]
    return out


def _scores(labels: np.ndarray, probs: np.ndarray, n_classes: int, n_boot: int) -> dict:
    """Accuracy and QWK of ``probs`` (slides, classes); with ``n_boot`` their 95 % bootstrap
    intervals over slides, the labels and the probabilities."""
    out = {"n": len(labels)}
    for metric in ("accuracy", "qwk"):
        out[metric] = score(metric, labels, probs, n_classes)
        if n_boot:
            out[f"{metric}_ci95"] = bootstrap_ci(lambda y, p: score(metric, y, p, n_classes), labels, probs,
                                                 n_boot=n_boot)
    if n_boot:
        out.update(labels=labels.tolist(), probs=probs.round(4).tolist())
    return out


def _probabilities(net: LocalNetwork, execution: Execution | None, x) -> jax.Array:
    """H's class probabilities of slide ``x``: through Big-Layers, or in memory as one jitted call."""
    if execution is None:
        return _in_memory_probabilities(net, x)
    return jax.nn.softmax(net.predict(paths_for(execution, len(net.local_modules)), x))


def _head_probabilities(net: LocalNetwork, execution: Execution | None, x) -> list:
    """Every head's class probabilities of slide ``x``, [A_1 … H]: through Big-Layers, or in memory
    as one jitted call."""
    if execution is None:
        return _in_memory_head_probabilities(net, x)
    return [jax.nn.softmax(l) for l in net.head_logits(paths_for(execution, len(net.local_modules)), x)]


@nnx.jit
def _in_memory_probabilities(net, x):
    return jax.nn.softmax(net.predict(paths_for(None, len(net.local_modules)), x))


@nnx.jit
def _in_memory_head_probabilities(net, x):
    return [jax.nn.softmax(l) for l in net.head_logits(paths_for(None, len(net.local_modules)), x)]