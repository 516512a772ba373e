"""One training loop for every encoder mode: data, step, metrics, checkpoint, eval — in that order.

``train(config)`` trains a ``MILClassifier`` (a ResNet encoder and a MIL aggregator) on the training
slides of a tile store, one bag of K tiles per slide per epoch, validates after every epoch, keeps
the latest and the best checkpoint (by validation QWK for PANDA, AUC for CAMELYON), and finally
restores the best and evaluates it on the test slides (all tiles, and R draws of K tiles).
``evaluate_run(workdir)`` does only the last part (``--eval_only``).

Resuming is exact: data order, tile draws and augmentation are functions of (seed, epoch, bag), the
checkpoint holds the global step, the model (with RNG streams) and the optimiser (with its gradient
accumulators), so a resumed run takes the same steps as an uninterrupted one.

Encoder modes (``bigjax.train.encoders``): ``big`` takes gradients eagerly through the Big-Layers
encoder and jits only the optimiser update; ``inmemory``, ``frozen`` and ``precomputed`` jit the whole
step (the last two train only the aggregator, on embeddings computed outside the gradient).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from bigjax.data.augment import augment_bag
from bigjax.data.bags import Bag, train_bags
from bigjax.data.manifest import read_manifest, select
from bigjax.data.store import TileStore
from bigjax.models import mil
from bigjax.train import encoders
from bigjax.train.checkpoint import RunCheckpoints
from bigjax.train.config import TrainConfig
from bigjax.train.evaluate import MetricsLog, evaluate, plot_curves, write_results
from bigjax.train.optim import make_optimizer

log = logging.getLogger(__name__)

__all__ = ["MILClassifier", "NonFiniteLossError", "build_model", "train", "evaluate_run"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the message names the step and the checkpoint kept."""


class MILClassifier(nnx.Module):
    """A tile encoder and a MIL aggregator (``head``): bag of tiles -> bag logits."""

    def __init__(self, encoder: nnx.Module, head: nnx.Module):
        self.encoder, self.head = encoder, head


def build_model(config: TrainConfig) -> MILClassifier:
    """The run's encoder (random or ``--init``) and aggregator, both seeded by ``config.seed``."""
    encoder = encoders.build_encoder(config.encoder, depth=config.depth, big_stages=config.big_stages,
                                     max_partition_bytes=config.max_partition_bytes,
                                     init=config.init, seed=config.seed)
    head = mil.build(config.aggregator, encoder.embed_dim, config.n_classes,
                     rngs=nnx.Rngs(config.seed + 1))
    return MILClassifier(encoder, head)


def trainable(mode: str):
    """What the optimiser updates: the whole model, or only the aggregator."""
    if encoders.TRAINS_ENCODER[mode]:
        return nnx.Param
    return nnx.All(nnx.Param, nnx.PathContains("head"))


# --- the step ---------------------------------------------------------------------------------

def batch_loss(model: MILClassifier, inputs: jax.Array, labels: jax.Array, encode: bool):
    """Mean bag loss of a batch: inputs are tiles (B, K, T, T, 3) when ``encode``, else (B, K, D)."""
    if encode:
        b, k = inputs.shape[:2]
        feats = model.encoder(inputs.reshape(b * k, *inputs.shape[2:]), train=True)
        feats = feats.reshape(b, k, -1)
    else:
        feats = inputs
    losses = [mil.bag_loss(model.head(feats[i], train=True), labels[i]) for i in range(len(labels))]
    return jnp.mean(jnp.stack(losses))


@nnx.jit(static_argnames=("encode", "mode"))
def jitted_step(model, optimizer, inputs, labels, *, encode: bool, mode: str):
    """One gradient of the batch loss and one (possibly accumulating) optimiser update, all jitted."""
    grad_fn = nnx.value_and_grad(batch_loss, argnums=nnx.DiffState(0, trainable(mode)))
    loss, grads = grad_fn(model, inputs, labels, encode)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _apply_update(model, optimizer, grads):
    optimizer.update(model, grads)


def big_step(model, optimizer, inputs, labels):
    """The same step with the Big-Layers encoder: gradients eagerly (host loops), update jitted."""
    grad_fn = nnx.value_and_grad(batch_loss, argnums=nnx.DiffState(0, nnx.Param))
    loss, grads = grad_fn(model, inputs, labels, True)
    _apply_update(model, optimizer, grads)
    return loss


# --- the data of a step -----------------------------------------------------------------------

def batches(bags: Iterator[Bag], size: int) -> Iterator[list[Bag]]:
    """Consecutive groups of ``size`` bags (the last one may be smaller)."""
    batch = []
    for bag in bags:
        batch.append(bag)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def augmented_tiles(batch: list[Bag]) -> np.ndarray:
    """uint8 (B, K, T, T, 3): each bag with its slide's augmentation draw, computed on the host CPU."""
    cpu = jax.devices("cpu")[0]
    return np.stack([bag.tiles if bag.aug is None else
                     np.asarray(augment_bag(jax.device_put(bag.tiles, cpu), bag.aug)) for bag in batch])


def make_inputs(mode: str, model: MILClassifier, cache, chunk: int) -> Callable[[list[Bag]], jax.Array]:
    """batch of bags -> the step's inputs: normalised tiles (big, inmemory) or embeddings (B, K, D)."""
    if mode == "precomputed":
        return lambda batch: np.stack([cache.features(b.slide_id, b.indices) for b in batch])
    if mode == "frozen":
        def frozen(batch):
            tiles = augmented_tiles(batch)
            b, k = tiles.shape[:2]
            flat = tiles.reshape(b * k, *tiles.shape[2:])
            return encoders.embed_tiles(model.encoder, flat, chunk=min(chunk, b * k)).reshape(b, k, -1)
        return frozen
    if mode == "big":  # Big-Layers take host (numpy) tiles
        return lambda batch: encoders.normalize_host(augmented_tiles(batch))
    return lambda batch: encoders.normalize(augmented_tiles(batch))


def make_embed(config: TrainConfig, model: MILClassifier, store: TileStore, cache):
    """Eval-mode embeddings of (slide row, tile indices), for ``bigjax.train.evaluate``."""
    if config.encoder == "precomputed":
        return lambda row, idx: cache.features(row.slide_id, idx)

    def embed(row, idx):
        parts = [encoders.embed_tiles(model.encoder, store.read(row.slide_id, idx[i:i + 1024]),
                                      config.embed_chunk) for i in range(0, len(idx), 1024)]
        return jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    return embed


# --- the run ----------------------------------------------------------------------------------

class Run:
    """What a run holds: its slides, store, model, optimiser, checkpoints and metrics log."""

    def __init__(self, config: TrainConfig, store: str | Path | None = None,
                 manifest: str | Path | None = None):
        self.config = config
        self.workdir = Path(config.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        rows = read_manifest(manifest or config.manifest_path)
        self.slides = {s: select(rows, s) for s in ("train", "val", "test")}
        self.store = TileStore(store or config.store)
        self.model = build_model(config)
        n_train = len(self.slides["train"])
        self.steps_per_epoch = max(1, math.ceil(n_train / config.batch_size))
        tx = make_optimizer(config, name=config.optimizer,
                            steps_per_epoch=max(1, self.steps_per_epoch // config.accum))
        self.optimizer = nnx.Optimizer(self.model, tx, wrt=trainable(config.encoder))
        self.checkpoints = RunCheckpoints(self.workdir)
        self.cache = None
        if config.encoder == "precomputed":
            self.cache = encoders.FeatureCache(self.workdir / "features")
        self.log = MetricsLog(self.workdir / "metrics.jsonl")

    def fill_cache(self, slides) -> None:
        if self.cache is not None:
            self.cache.fill(self.model.encoder, self.store, slides, self.config.embed_chunk,
                            progress=self.config.progress)

    def evaluate(self, split: str, *, all_tiles: bool, draws: int, k: int, slides=None):
        c = self.config
        slides = self.slides[split] if slides is None else slides
        embed = make_embed(c, self.model, self.store, self.cache)
        return evaluate(self.model.head, embed, slides, task=c.task, split=split, all_tiles=all_tiles,
                        draws=draws, k=k, seed=c.seed, progress=c.progress)

    def validate(self) -> dict:
        c = self.config
        results = self.evaluate("val", all_tiles=c.val_tiles == 0, draws=c.val_draws,
                                k=c.val_tiles)
        return {f"val_{m}": r.mean(m) for r in results for m in r.values}


def train(config: TrainConfig, *, resume: bool = False,
          on_step: Callable[[int], None] | None = None) -> dict:
    """Train, validate every epoch, checkpoint, then evaluate the best checkpoint on the test slides.

    Args:
      config: the run.
      resume: continue from the latest checkpoint in ``config.workdir`` (else the workdir must
        have none).
      on_step: called with the global step after every step (tests use it to simulate a kill).
    Returns:
      the final results (as written to ``<workdir>/results.json``).
    Raises:
      NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is kept.
    """
    run = Run(config)
    c, ckpt = config, run.checkpoints
    meta = _start(run, resume)
    (run.workdir / "config.json").write_text(c.to_json())
    run.fill_cache([s for split in run.slides.values() for s in split])
    step_fn = _step_fn(c, run)
    step, augment = meta["step"], _augment(c)
    for epoch in range(step // run.steps_per_epoch, c.epochs):
        # data: this epoch's bags from where the last checkpoint stopped
        first = step - epoch * run.steps_per_epoch
        bags = train_bags(run.store, run.slides["train"], k=c.tiles_per_bag, seed=c.seed, epoch=epoch,
                          start=first * c.batch_size, augment=augment)
        bar = tqdm(batches(bags, c.batch_size), total=run.steps_per_epoch, initial=first,
                   desc=f"epoch {epoch + 1}/{c.epochs}", unit="step", disable=not c.progress)
        for batch in bar:
            # step
            start = time.perf_counter()
            loss = float(step_fn(batch))
            seconds = time.perf_counter() - start
            if not math.isfinite(loss):
                _stop_non_finite(loss, step, epoch, batch, ckpt)
            step += 1
            # metrics
            meta["loss_sum"] += loss
            meta["loss_count"] += 1
            tiles_per_s = sum(len(b.tiles) for b in batch) / seconds
            bar.set_postfix(loss=f"{meta['loss_sum'] / meta['loss_count']:.4f}",
                            tiles_per_s=f"{tiles_per_s:.1f}")
            if step % c.log_every == 0:
                run.log.write(kind="step", step=step, epoch=epoch, loss=loss, tiles_per_s=tiles_per_s)
            # checkpoint (mid-epoch, when asked)
            if c.checkpoint_every and step % c.checkpoint_every == 0 and step % run.steps_per_epoch:
                meta["step"] = step
                ckpt.save(step, run.model, run.optimizer, meta)
            if on_step is not None:
                on_step(step)
        bar.close()
        # eval, then the epoch's checkpoint
        val = run.validate()
        train_loss = meta["loss_sum"] / max(meta["loss_count"], 1)
        meta.update(loss_sum=0.0, loss_count=0, step=step)
        score = val[f"val_{c.select_metric}"]
        is_best = meta["best"] is None or score > meta["best"]
        if is_best:
            meta.update(best=score, best_step=step)
        ckpt.save(step, run.model, run.optimizer, meta, best=is_best)
        run.log.write(kind="epoch", step=step, epoch=epoch + 1, train_loss=train_loss, **val)
        log.info("epoch %d: train loss %.4f, %s", epoch + 1, train_loss,
                 ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        plot_curves(run.workdir / "metrics.jsonl", run.workdir / "curves.png")
    return _final_evaluation(run)


def evaluate_run(workdir: str | Path, manifest: str | Path | None = None, **overrides) -> dict:
    """Restore the best checkpoint of a finished (or running) run and evaluate it (``--eval_only``).

    Args:
      workdir: the run's folder (holds config.json and best/).
      manifest: evaluate the "test" slides of another store's manifest (an external test set;
        the store is the manifest's folder); default: the run's own test slides.
      **overrides: config fields to change (e.g. eval_draws=10).
    """
    config = TrainConfig.from_json((Path(workdir) / "config.json").read_text(), workdir=str(workdir),
                                   **overrides)
    store = Path(manifest).parent if manifest else None
    run = Run(config, store=store, manifest=manifest)
    return _final_evaluation(run, tag="external" if manifest else "")


# --- pieces of the run ------------------------------------------------------------------------

def _start(run: Run, resume: bool) -> dict:
    """Fresh meta, or the latest checkpoint's (restored into the model and optimiser)."""
    if resume:
        meta = run.checkpoints.restore_latest(run.model, run.optimizer)
        if meta is not None:
            log.info("resuming %s at step %d", run.workdir, meta["step"])
            return meta
        log.info("no checkpoint in %s: starting from scratch", run.workdir)
    elif run.checkpoints.latest.latest_step() is not None:
        raise FileExistsError(f"workdir {run.workdir} already holds checkpoints; pass --resume to "
                              f"continue that run, or choose another --workdir")
    return {"step": 0, "best": None, "best_step": None, "loss_sum": 0.0, "loss_count": 0}


def _step_fn(c: TrainConfig, run: Run) -> Callable[[list[Bag]], jax.Array]:
    make = make_inputs(c.encoder, run.model, run.cache, c.embed_chunk)
    encode = encoders.TRAINS_ENCODER[c.encoder]

    def step(batch):
        inputs, labels = make(batch), np.array([b.label for b in batch], np.int32)
        if c.encoder == "big":
            return big_step(run.model, run.optimizer, inputs, labels)
        return jitted_step(run.model, run.optimizer, inputs, labels, encode=encode, mode=c.encoder)
    return step


def _augment(c: TrainConfig):
    if not c.augment:
        return None
    if c.encoder == "precomputed":
        log.warning("--augment has no effect with --encoder=precomputed (embeddings are computed once)")
        return None
    from bigjax.data.augment import AugmentConfig
    return AugmentConfig()


def _stop_non_finite(loss: float, step: int, epoch: int, batch: list[Bag], ckpt: RunCheckpoints):
    kept = ckpt.latest.latest_step()
    where = (f"checkpoint of step {kept} in {ckpt.latest.directory} is kept" if kept is not None
             else "no checkpoint was saved yet")
    raise NonFiniteLossError(
        f"training loss is {loss} at step {step + 1} (epoch {epoch + 1}, slides "
        f"{', '.join(b.slide_id for b in batch)}); stopped without saving. The last good {where}; "
        f"lower --lr or check the data, then --resume")


def _final_evaluation(run: Run, tag: str = "") -> dict:
    """Restore the best checkpoint, evaluate val and test, print and write the results table."""
    c = run.config
    meta = run.checkpoints.restore_best(run.model)
    if meta is None:
        raise FileNotFoundError(f"no best checkpoint in {run.workdir / 'best'}: nothing trained yet")
    run.fill_cache([s for split in run.slides.values() for s in split])
    results = []
    if not tag and run.slides["val"]:
        results += run.evaluate("val", all_tiles=True, draws=0, k=0)
    if run.slides["test"]:
        results += run.evaluate("test", all_tiles=True, draws=c.eval_draws, k=c.eval_tiles)
    summary = write_results(run.workdir, results, meta, c, tag=tag)
    for r in results:
        run.log.write(kind="final" + (f"_{tag}" if tag else ""), step=meta["step"], **r.to_json())
    return summary
