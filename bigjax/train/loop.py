"""One training loop for every encoder mode: data, step, metrics, checkpoint, eval — in that order.

``train(config)`` trains a ``MILClassifier`` (a tile encoder and a MIL aggregator) on the training
slides of a tile store, one bag of K tiles per slide per epoch, validates after every epoch, keeps
the latest and the best checkpoint (by validation QWK for PANDA, AUC for CAMELYON), and finally
restores the best and evaluates it on the test slides (all tiles, and R draws of K tiles).
``evaluate_run(workdir)`` does only the last part (``--eval_only``).

Resuming is exact: data order, tile draws and augmentation are functions of (seed, epoch, bag), the
checkpoint holds the global step, the model (with RNG streams) and the optimiser (with its gradient
accumulators), so a resumed run takes the same steps as an uninterrupted one.

What differs between encoder modes (building the encoder, what trains, the step's inputs, the step,
eval-mode embeddings) is asked of the run's mode object (``bigjax.train.modes``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from bigjax.data.bags import Bag, train_bags
from bigjax.data.manifest import read_manifest, require_splits, select
from bigjax.errors import Diverged, Interrupted
from bigjax.data.store import TileStore
from bigjax.models import mil
from bigjax.parallel.distributed import is_main_process, share_from_main
from bigjax import lock
from bigjax.train import modes, recovery
from bigjax.train.checkpoint import RunCheckpoints
from bigjax.train.config import FREE_ON_RESUME, RECOVERIES, TrainConfig, flat_settings
from bigjax.train.evaluate import evaluate
from bigjax.train.optim import make_optimizer
from bigjax.train.report import MetricsLog, plot_curves, write_results
from bigjax.train.steps import MILClassifier

log = logging.getLogger(__name__)

__all__ = ["MILClassifier", "NonFiniteLossError", "build_model", "Run", "train", "evaluate_run", "workdir_lock"]


class NonFiniteLossError(Diverged):
    """The training loss became NaN or inf; the message names the step and the checkpoint kept."""


def build_model(config: TrainConfig, mode: modes.EncoderMode) -> MILClassifier:
    """The mode's encoder (random or ``--init``) and the aggregator, both seeded by ``config.seed``."""
    encoder = mode.build_encoder(nnx.Rngs(config.seed))
    head = mil.build(config.aggregator, encoder.embed_dim, config.n_classes,
                     rngs=nnx.Rngs(config.seed + 1))
    return MILClassifier(encoder, head)


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


class Run:
    """What a run holds: its mode, slides, store, model, optimiser, checkpoints and metrics log."""

    def __init__(self, config: TrainConfig, store: str | Path | None = None,
                 manifest: str | Path | None = None):
        self.config = config
        self.workdir = Path(config.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mode = modes.get(config, self.workdir)
        rows = read_manifest(manifest or config.manifest_path, n_classes=config.n_classes)
        self.slides = {s: select(rows, s) for s in ("train", "val", "test")}
        self.store = TileStore(store or config.store)
        self.model = build_model(config, self.mode)
        self.steps_per_epoch = max(1, math.ceil(len(self.slides["train"]) / config.batch_size))
        tx = make_optimizer(config.optim, epochs=config.epochs,
                            steps_per_epoch=max(1, self.steps_per_epoch // config.optim.accum))
        self.optimizer = nnx.Optimizer(self.model, tx, wrt=self.mode.trainable())
        # a multi-process run (--processes): process 0 writes checkpoints, metrics and results; the
        # others take the steps with it (the encoder mesh spans their devices) and write nothing
        self.writes = is_main_process()
        self.resumes: list[dict] = []  # the recoveries of earlier resumes and this one (config.json)
        self.checkpoints = RunCheckpoints(self.workdir) if self.writes else None
        self.log = MetricsLog(self.workdir / "metrics.jsonl")

    def close(self) -> None:
        """Close the metrics log's TensorBoard writer and the checkpoint manager."""
        self.log.close()
        if self.checkpoints is not None:
            self.checkpoints.close()

    def prepare(self) -> None:
        """The mode's work before training or evaluation (e.g. precomputing embeddings)."""
        self.mode.prepare(self.model, self.store, [s for split in self.slides.values() for s in split])

    def step(self, batch: list[Bag]) -> float:
        """One training step on a batch of bags; returns its loss."""
        inputs = self.mode.inputs(self.model, batch)
        labels = np.array([b.label for b in batch], np.int32)
        return float(self.mode.step(self.model, self.optimizer, inputs, labels))

    def evaluate(self, split: str, *, all_tiles: bool, draws: int, k: int):
        c = self.config

        def embed(row, idx):
            return self.mode.embed(self.model, self.store, row, idx)
        return evaluate(self.model.head, embed, self.slides[split], task=c.task, split=split,
                        all_tiles=all_tiles, draws=draws, k=k, seed=c.seed, progress=c.progress)

    def validate(self) -> dict:
        c = self.config
        results = self.evaluate("val", all_tiles=c.val_tiles == 0, draws=c.val_draws,
                                k=c.val_tiles)
        return {f"val_{m}": r.mean(m) for r in results for m in r.values}


def train(config: TrainConfig, *, resume: bool = False,
          on_step: Callable[[int], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> dict:
    """Train, validate every epoch, checkpoint, then evaluate the best checkpoint on the test slides.

    Args:
      config: the run.
      resume: continue from the latest checkpoint in ``config.workdir`` (else the workdir must
        have none).
      on_step: called with the global step after every step (tests use it to simulate a kill).
      should_stop: polled after every step; True saves the latest checkpoint and stops (on an
        epoch's last step, after that epoch's validation; the CLIs pass ``bigjax.train.interrupt``'s
        Ctrl-C request).
    Returns:
      the final results (as written to ``<workdir>/results.json``).
    Raises:
      NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is kept.
      Interrupted: ``should_stop`` asked to stop; the run continues with ``resume=True``.
    """
    with workdir_lock(config.workdir):
        run = Run(config)
        try:
            return _train(run, resume, on_step, should_stop)
        finally:
            run.close()


def _train(run: Run, resume: bool, on_step, should_stop) -> dict:
    """``train``'s steps in order: start or resume, prepare, epochs, final evaluation."""
    config = run.config
    require_splits([s for split in run.slides.values() for s in split], ("train", "val"),
                   hint="pass --splits_csv or re-tile the store")
    meta = _from_main(run, _start(run, resume) if run.writes else None)
    if run.writes:
        (run.workdir / "config.json").write_text(config.to_json(resumes=run.resumes))
    run.prepare()
    augment = _augment(run)
    try:
        for epoch in range(meta["step"] // run.steps_per_epoch, config.epochs):
            _train_epoch(run, meta, epoch, augment, on_step, should_stop)
            _end_epoch(run, meta, epoch)
            if should_stop is not None and should_stop():  # asked during the epoch's last step
                _interrupt(run, meta)
    except Diverged as error:  # say how to continue: from the last checkpoint, a lower learning rate
        if error.resume_flags is not None:
            raise
        raise type(error)(error.reason, resume_flags=f"--resume --lr={config.optim.lr / 10:.3g}") from None
    return _final_evaluation(run) if run.writes else {}


def _train_epoch(run: Run, meta: dict, epoch: int, augment, on_step, should_stop) -> None:
    """The epoch's steps from where the last checkpoint stopped: data, step, metrics, checkpoint."""
    c, step = run.config, meta["step"]
    first = step - epoch * run.steps_per_epoch
    bags = train_bags(run.store, run.slides["train"], k=c.tiles_per_bag, seed=c.seed, epoch=epoch,
                      start=first * c.batch_size, augment=augment)
    bar = tqdm(batches(bags, c.batch_size), total=run.steps_per_epoch, initial=first,
               desc=f"epoch {epoch + 1}/{c.epochs}", unit="step", disable=not c.progress)
    for batch in bar:
        start = time.perf_counter()
        loss = run.step(batch)
        seconds = time.perf_counter() - start
        if not math.isfinite(loss):
            _stop_non_finite(loss, step, epoch, batch, run.checkpoints)
        step += 1
        meta["loss_sum"] += loss
        meta["loss_count"] += 1
        tiles_per_s = sum(len(b.tiles) for b in batch) / seconds
        bar.set_postfix(loss=f"{meta['loss_sum'] / meta['loss_count']:.4f}",
                        tiles_per_s=f"{tiles_per_s:.1f}")
        if step % c.log_every == 0 and run.writes:
            run.log.write(kind="step", step=step, epoch=epoch, loss=loss, tiles_per_s=tiles_per_s)
        if (c.checkpoint_every and step % c.checkpoint_every == 0 and step % run.steps_per_epoch
                and run.writes):
            meta["step"] = step
            run.checkpoints.save(step, run.model, run.optimizer, meta)
        if on_step is not None:
            on_step(step)
        # a stop on the epoch's last step waits for its validation (``train``): a checkpoint saved
        # here would resume in the next epoch and never validate this one
        if should_stop is not None and step % run.steps_per_epoch and should_stop():
            meta["step"] = step
            if run.writes:
                run.checkpoints.save(step, run.model, run.optimizer, meta)
            _interrupt(run, meta)
    bar.close()
    meta["step"] = step


def _interrupt(run: Run, meta: dict):
    """Stop on request, the latest checkpoint (of ``meta["step"]``) saved."""
    step = meta["step"]
    if not run.writes:
        raise Interrupted(f"stopped at step {step} (process {jax.process_index()})")
    raise Interrupted(f"stopped at step {step}; the checkpoint is in {run.checkpoints.directory}:"
                      " continue with --resume")


def _end_epoch(run: Run, meta: dict, epoch: int) -> None:
    """Validate, keep the epoch's checkpoint (and the best), log and plot (process 0 of several)."""
    if not run.writes:
        meta.update(loss_sum=0.0, loss_count=0)
        return
    c = run.config
    val = run.validate()
    train_loss = meta["loss_sum"] / max(meta["loss_count"], 1)
    meta.update(loss_sum=0.0, loss_count=0)
    score = val[f"val_{c.select_metric}"]
    is_best = meta["best"] is None or improves(score, meta["best"])
    if is_best:
        meta.update(best=score, best_step=meta["step"])
    run.checkpoints.save(meta["step"], run.model, run.optimizer, meta, best=is_best)
    run.log.write(kind="epoch", step=meta["step"], epoch=epoch + 1, train_loss=train_loss, **val)
    log.info("epoch %d: train loss %.4f, %s", epoch + 1, train_loss,
             ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
    plot_curves(run.workdir / "metrics.jsonl", run.workdir / "curves.png")


def improves(score: float, best: float) -> bool:
    """Whether a validation score beats the best so far; an undefined one (NaN: an AUC of a single
    class) never does, and any defined one beats it (else a NaN first epoch would stay best)."""
    return math.isfinite(score) and (not math.isfinite(best) or score > best)


def evaluate_run(workdir: str | Path, manifest: str | Path | None = None, **overrides) -> dict:
    """Restore the best checkpoint of a finished run and evaluate it (``--eval_only``).

    A run still training holds the workdir (``workdir_lock``): the evaluation is refused until it ends
    (both would write results.md, and opening the checkpoints removes unfinished saves).

    Args:
      workdir: the run's folder (holds config.json and checkpoints/).
      manifest: evaluate the "test" slides of another store's manifest (an external test set;
        the store is the manifest's folder); default: the run's own test slides.
      **overrides: config fields to change (e.g. eval_draws=10).
    """
    with workdir_lock(workdir, "an evaluation (--eval_only)"):
        saved = Path(workdir) / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"--workdir {workdir} holds no run ({saved.name} missing): train there "
                                    "first, or check --workdir")
        config = TrainConfig.from_json(saved.read_text(), workdir=str(workdir), **overrides)
        run = Run(config, store=Path(manifest).parent if manifest else None, manifest=manifest)
        try:
            return _final_evaluation(run, tag="external" if manifest else "")
        finally:
            run.close()


def workdir_lock(workdir: str | Path, what: str = "a training run"):
    """One run per workdir: ``<workdir>/run.lock`` held by the process that writes there (process 0 of
    several; ``bigjax.lock``). Taken before the checkpoint manager, which cleans unfinished saves."""
    if not is_main_process():
        return contextlib.nullcontext()
    return lock.hold(Path(workdir) / lock.RUN_LOCK, what)


# --- pieces of the run ------------------------------------------------------------------------

def _start(run: Run, resume: bool) -> dict:
    """Fresh meta, or the latest checkpoint's (restored into the model and optimiser)."""
    if resume:
        changes = _resume_changes(run)
        meta = run.checkpoints.restore_latest(run.model, run.optimizer)
        if meta is not None:
            log.info("resuming %s at step %d", run.workdir, meta["step"])
            if changes:
                _record_recovery(run, meta["step"], changes)
            return meta
        log.info("no checkpoint in %s: starting from scratch", run.workdir)
    elif run.checkpoints.latest_step() is not None:
        raise FileExistsError(f"workdir {run.workdir} already holds checkpoints; pass --resume to "
                              f"continue that run, or choose another --workdir")
    return {"step": 0, "best": None, "best_step": None, "loss_sum": 0.0, "loss_count": 0}


def _from_main(run: Run, meta: dict | None) -> dict:
    """A multi-process run: every process takes process 0's start (model, optimiser, step)."""
    if jax.process_count() == 1:
        return meta
    step = share_from_main(run.model, run.optimizer, meta["step"] if run.writes else 0)
    return meta if run.writes else {"step": step, "loss_sum": 0.0, "loss_count": 0}


def _resume_changes(run: Run) -> dict:
    """The recoveries a resume asks for ({"optim.lr": [old, new], ...}); any other changed setting is
    refused, naming each (``bigjax.train.recovery``). Reads the run's history of resumes into ``run``."""
    saved = run.workdir / "config.json"
    if not saved.is_file():
        return {}
    old = json.loads(saved.read_text())
    run.resumes = old.pop("resumes", [])
    changes, refused = recovery.compare(flat_settings(old), flat_settings(json.loads(run.config.to_json())),
                                        RECOVERIES, free=FREE_ON_RESUME)
    if refused:
        raise ValueError(recovery.refusal(run.workdir, refused, {"--lr": recovery.LOWER,
                                                                 "--epochs": recovery.MORE}))
    return changes


def _record_recovery(run: Run, step: int, changes: dict) -> None:
    """Say what the resume changed, in the log, the metrics log and config.json's ``resumes``."""
    row = {"step": step, "changed": changes}
    if "epochs" in changes:
        row["schedule"] = _schedule_note(run, *changes["epochs"])
    run.resumes.append(row)
    run.log.write(kind="resume", **row)
    log.info("resumed with changed settings: %s%s",
             "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()),
             f" ({row['schedule']})" if "schedule" in row else "")


def _schedule_note(run: Run, old: int, new: int) -> str:
    """What more epochs do to the learning-rate schedule (cosine and DEMON are functions of the length)."""
    o = run.config.optim
    updates = max(1, run.steps_per_epoch // o.accum) * new
    if o.schedule == "cosine" or o.name == "demon_adam":
        what = " and ".join(n for n, on in (("the cosine schedule", o.schedule == "cosine"),
                                            ("DEMON's momentum decay", o.name == "demon_adam")) if on)
        return f"{what} recomputed over {new} epochs ({updates} optimiser updates), not {old}"
    return f"the {o.schedule} schedule does not depend on the number of epochs"
def _augment(run: Run):
    c = run.config
    if not c.augment:
        return None
    if not run.mode.augments:
        log.warning("--augment has no effect with --encoder=%s (embeddings are computed once)",
                    c.encoder)
        return None
    from bigjax.data.augment import AugmentConfig
    return AugmentConfig()


def _stop_non_finite(loss: float, step: int, epoch: int, batch: list[Bag],
                     ckpt: RunCheckpoints | None):
    kept = ckpt.latest_step() if ckpt is not None else None  # None: not process 0 of several
    where = (f"the last good checkpoint, of step {kept} in {ckpt.directory}, is kept" if kept is not None
             else "no checkpoint was saved yet")
    raise NonFiniteLossError(
        f"training loss is {loss} at step {step + 1} (epoch {epoch + 1}, slides "
        f"{', '.join(b.slide_id for b in batch)}); stopped without saving: {where}")


def _final_evaluation(run: Run, tag: str = "") -> dict:
    """Restore the best checkpoint, evaluate val and test, print and write the results table."""
    c = run.config
    meta = run.checkpoints.restore_best(run.model)
    if meta is None:
        raise FileNotFoundError(f"no best checkpoint in {run.checkpoints.directory}: nothing trained "
                                "yet (train first, or check --workdir)")
    if meta.get("best_step") not in (None, meta["step"]):  # the best did not restore: say what is evaluated
        log.warning("evaluating step %d, not the best by validation (step %s)", meta["step"], meta["best_step"])
        meta = {**meta, "best_step": meta["step"], "best": None}
    run.prepare()
    results = []
    if not tag and run.slides["val"]:
        results += run.evaluate("val", all_tiles=True, draws=0, k=0)
    if run.slides["test"]:
        results += run.evaluate("test", all_tiles=True, draws=c.eval_draws, k=c.eval_tiles)
    summary = write_results(run.workdir, results, meta, c, tag=tag)
    for r in results:
        run.log.write(kind="final" + (f"_{tag}" if tag else ""), step=meta["step"], **r.to_json())
    return summary
