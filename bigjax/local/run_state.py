"""What a whole-slide local run keeps on disk: its checkpoints, settings and metrics log, for ``--resume``.

The checkpoints are ``bigjax.train.checkpoint.RunCheckpoints`` (orbax, one atomic commit per save,
the latest and the best by validation together): the network's whole NNX state (parameters, the RFR
decoders' BatchNorm statistics, the heads' dropout RNG streams) and every module's optimisers (AdamW
moments and the gradient-accumulation buffers), with a JSON meta holding where the run stands (slides
done, epoch, position in the epoch, the epoch's losses so far, the best validation score). The slide
order, flips and RFR patches are drawn from generators seeded by (seed, epoch, position), so a run
resumed from any checkpoint takes the steps the uninterrupted run takes.

``--resume`` may lower the learning rates and add epochs (recorded in config.json's ``resumes`` and a
``resume`` row); any other changed setting is refused, each named (``bigjax.train.recovery``).

``metrics.jsonl`` gets one row per slide and per epoch; a resume drops the rows written after the
checkpoint it starts from (they are written again), so the log reads as one run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from flax import nnx

from bigjax.train import recovery
from bigjax.train.checkpoint import RunCheckpoints

log = logging.getLogger(__name__)

__all__ = ["TrainingState", "RECOVERIES"]

# what --resume may change (``bigjax.train.recovery``): lower learning rates (the step decays are
# relative to them), more epochs (no schedule depends on their number); and where the run lives
RECOVERIES = {"lr_backbone": recovery.LOWER, "lr_heads": recovery.LOWER, "epochs": recovery.MORE}
FREE_ON_RESUME = ("workdir", "n_boot", "checkpoint_every", "host_memory", "spill_dir")


class TrainingState:
    """A run's network, optimisers (one NNX object, e.g. an ``nnx.List``), checkpoints and log.

    Args:
      workdir: the run's folder (checkpoints/, config.json, metrics.jsonl).
      net: the network trained.
      optimizers: an NNX object holding all of its optimisers.
    """

    def __init__(self, workdir: str | Path, net: nnx.Module, optimizers: nnx.Module):
        self.workdir = Path(workdir)
        self.net, self.optimizers = net, optimizers
        self.checkpoints = RunCheckpoints(self.workdir)
        self.metrics = self.workdir / "metrics.jsonl"

    def start(self, config, resume: bool) -> dict:
        """A fresh run's meta, or (``resume``) the latest checkpoint's, restored into net and optimisers.

        Raises:
          FileExistsError: not ``resume`` and the workdir already holds checkpoints.
          ValueError: ``resume`` with settings other than the run's own.
        """
        saved = self.workdir / "config.json"
        settings = json.loads(json.dumps(dataclasses.asdict(config)))
        if resume:
            changes, resumes = _resume_changes(settings, saved)
            meta = self.checkpoints.restore_latest(self.net, self.optimizers)
            if meta is not None:
                log.info("resuming %s after slide %d (epoch %d)", self.workdir, meta["step"],
                         meta["epoch"] + 1)
                self._drop_rows_after(meta)
                if changes:  # recorded in config.json and the metrics log
                    resumes.append({"step": meta["step"], "changed": changes})
                    self.log(kind="resume", step=meta["step"], epoch=meta["epoch"], changed=changes)
                    log.info("resumed with changed settings: %s",
                             "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
                saved.write_text(json.dumps({**settings, "resumes": resumes} if resumes else settings, indent=1))
                return meta
            log.info("no checkpoint in %s: starting from scratch", self.workdir)
        elif self.checkpoints.latest_step() is not None:
            raise FileExistsError(f"workdir {self.workdir} already holds checkpoints; pass --resume to "
                                  "continue that run, or choose another --workdir")
        saved.write_text(json.dumps(settings, indent=1))
        self.metrics.write_text("")
        return {"step": 0, "epoch": 0, "slide": 0, "losses": [], "last_losses": None,
                "best": None, "best_epoch": None}

    def save(self, meta: dict, *, best: bool = False) -> None:
        """Commit the state after ``meta["step"]`` slides (and, with ``best``, make it the best)."""
        self.checkpoints.save(meta["step"], self.net, self.optimizers, meta, best=best)

    def log(self, **row) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def _drop_rows_after(self, meta: dict) -> None:
        """Keep the slides' rows up to the checkpoint's and the rows of the epochs it completed."""
        rows = self.rows() if self.metrics.is_file() else []
        kept = [r for r in rows if (r["step"] <= meta["step"] if r["kind"] == "step"
                                    else r["epoch"] <= meta["epoch"])]
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _resume_changes(settings: dict, saved: Path) -> tuple[dict, list]:
    """The recoveries a resume asks for (lower learning rates, more epochs: ``RECOVERIES``) and the
    run's earlier resumes; any other changed setting would silently give another run and is refused."""
    if not saved.is_file():
        return {}, []
    old = json.loads(saved.read_text())
    resumes = old.pop("resumes", [])
    changes, refused = recovery.compare(old, settings, RECOVERIES, free=FREE_ON_RESUME)
    if refused:
        raise ValueError(recovery.refusal(saved.parent, refused, {f"--{k}": v for k, v in RECOVERIES.items()}))
    return changes, resumes
