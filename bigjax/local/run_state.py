"""What a whole-slide local run keeps on disk: its checkpoints, settings and metrics log, for ``--resume``.

The checkpoints are ``bigjax.train.checkpoint.RunCheckpoints`` (orbax, one atomic commit per save,
the latest and the best by validation together): the network's whole NNX state (parameters, the RFR
decoders' BatchNorm statistics, the heads' dropout RNG streams) and every module's optimisers (AdamW
moments and the gradient-accumulation buffers), with a JSON meta holding where the run stands (slides
done, epoch, position in the epoch, the epoch's losses so far, the best validation score). The slide
order, flips and RFR patches are drawn from generators seeded by (seed, epoch, position), so a run
resumed from any checkpoint takes the steps the uninterrupted run takes.

``metrics.jsonl`` gets one row per slide and per epoch; a resume drops the rows written after the
checkpoint it starts from (they are written again), so the log reads as one run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from flax import nnx

from bigjax.train.checkpoint import RunCheckpoints

log = logging.getLogger(__name__)

__all__ = ["TrainingState"]


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
            _same_settings(settings, saved)
            meta = self.checkpoints.restore_latest(self.net, self.optimizers)
            if meta is not None:
                log.info("resuming %s after slide %d (epoch %d)", self.workdir, meta["step"],
                         meta["epoch"] + 1)
                self._drop_rows_after(meta)
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


# where the run keeps its activations, not what it computes (a resume may move to another machine)
MACHINE_SETTINGS = ("host_memory", "spill_dir")


def _same_settings(settings: dict, saved: Path) -> None:
    """A resumed run keeps its settings: another one would silently give another run."""
    if not saved.is_file():
        return
    old = json.loads(saved.read_text())
    changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items()
               if old.get(k) != v and k not in MACHINE_SETTINGS]
    if changed:
        raise ValueError(f"--resume of {saved.parent} with other settings ({'; '.join(changed)}); "
                         "resume with the run's own settings, or choose another --workdir")
