"""orbax checkpoints of a training run: the latest (to resume) and the best by validation metric.

A checkpoint holds the whole NNX state of the model (parameters, BatchNorm statistics, RNG streams)
and of the optimiser (optax state, gradient accumulators), plus a JSON ``meta`` dict (the global
step, epoch, best metric so far) and a pointer to the best step. Saves are synchronous, and a state
holding NaN or inf is never saved (``save`` raises ``Diverged``), so the latest checkpoint is always
one to resume from.

One commit per save. The best model is not a second checkpoint written beside the latest: it is a
kept step of the same orbax manager, and every step names the best step at its time. orbax writes a
step to a temporary folder and renames it when complete, so a kill at any moment leaves the steps
committed before it, each naming a best that is still on disk: old steps are deleted only after the
new one is committed, a step named as best by a kept step is never deleted, and a deletion is a rename
out of the way (into ``checkpoints/deleted/``, emptied afterwards) so it is atomic too.

The newest two steps are kept (``keep``), so a step whose files are damaged after its commit (a
truncated data file) still has one to fall back to: a restore (``--resume``, ``--eval_only``) names
the step that does not restore in one warning and uses the one before it (a resume moves the damaged
step into ``checkpoints/damaged/``, to save that step again). A save that finds the disk
full removes its unfinished folder and says, in one line, where and how large a checkpoint is; the
previous steps are untouched (``DiskFull``).

Layout under the workdir::

    checkpoints/<step>/model    model state (what ``restore_best`` reads)
    checkpoints/<step>/opt      optimiser state
    checkpoints/<step>/meta     the loop's meta dict (JSON)
    checkpoints/<step>/best     {"step": the best step when this one was saved, or null}
    checkpoints/deleted/        steps being deleted
    checkpoints/damaged/        steps that did not restore, set aside by a resume

References: orbax.checkpoint.CheckpointManager (atomic step folders, Composite items).
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from bigjax.errors import EXIT_FAILED, Diverged, UserError, disk_full
from bigjax.train.finite import first_non_finite, non_finite_count

__all__ = ["RunCheckpoints", "CheckpointUnreadable", "DiskFull", "state_tree", "load_state_tree", "unreadable_reason"]

log = logging.getLogger(__name__)

DELETED = "deleted"  # subfolder that steps are renamed into before they are removed
DAMAGED = "damaged"  # subfolder that steps which do not restore are moved into when a run resumes


class DiskFull(UserError):
    """A save found the disk full; the message names the folder and the size of a checkpoint."""

    exit_code = EXIT_FAILED


class CheckpointUnreadable(UserError):
    """No step of a run's checkpoints restores; the message names each step and why."""


def state_tree(model: nnx.Module, optimizer: nnx.Optimizer | None = None) -> dict:
    """The savable pure tree of model (and optimiser) state; typed PRNG keys become their uint32 data."""
    tree = {"model": nnx.to_pure_dict(nnx.state(model))}
    if optimizer is not None:
        tree["opt"] = nnx.to_pure_dict(nnx.state(optimizer))
    return jax.tree.map(_key_to_data, tree)


def load_state_tree(tree: dict, model: nnx.Module, optimizer: nnx.Optimizer | None = None) -> None:
    """Put a tree from ``state_tree`` (or restored from disk) back into model and optimiser, in place."""
    for name, obj in (("model", model), ("opt", optimizer)):
        if obj is None or name not in tree:
            continue
        state = nnx.state(obj)
        template = nnx.to_pure_dict(state)
        values = jax.tree.map(_data_to_key, template, _with_int_keys(tree[name], template))
        nnx.replace_by_pure_dict(state, values)
        nnx.update(obj, state)


class RunCheckpoints:
    """The latest and the best checkpoints of one run's workdir, committed together.

    Args:
      workdir: the run's folder.
      keep: latest checkpoints kept (the newest ``keep`` steps), besides the best ones they name.
    """

    def __init__(self, workdir: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep={keep}: at least the latest checkpoint must be kept")
        self.keep = keep
        root = Path(workdir).absolute()
        if (root / "best").is_dir():
            raise ValueError(f"workdir {root} holds checkpoints of an older bigjax (best/ apart from checkpoints/); "
                             f"evaluate it with that version, or choose another --workdir")
        self.latest = ocp.CheckpointManager(
            root / "checkpoints",
            options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=True, todelete_subdir=DELETED,
                                                 **_one_process(root / "checkpoints")))
        self._purge_deleted()

    @property
    def directory(self) -> Path:
        """The folder holding the step folders."""
        return Path(self.latest.directory)

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self.latest.latest_step()

    def best_step(self) -> int | None:
        """The best step named by the newest step whose best is on disk, or None."""
        return next(iter(self._named_bests()), None)

    def _named_bests(self) -> list[int]:
        """The steps on disk named as best, by the newest steps first (a step's unreadable pointer is
        passed over)."""
        steps, bests = set(self.latest.all_steps()), []
        for step in sorted(steps, reverse=True):
            best = self._readable_best_of(step)
            if best in steps and best not in bests:
                bests.append(best)
        return bests

    def save(self, step: int, model, optimizer, meta: dict, *, best: bool = False) -> None:
        """Commit model, optimiser and meta as ``step``; with ``best``, this step becomes the best.

        Saving a step that is already committed is a no-op unless it must now become the best.

        Raises:
          Diverged: the model or optimiser state holds NaN or inf (nothing is written).
        """
        state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        total = non_finite_count(state)
        if total:
            layer, count = first_non_finite(state)
            kept = self.latest_step()
            raise Diverged(f"refusing to save step {step}: {total:,} non-finite values in the model and optimiser "
                           f"state, {count:,} of them in {layer}; " + (
                               f"the last saved step, {kept}, is kept in {self.directory}" if kept is not None
                               else "no step was saved before it"))
        best_step = step if best else self.best_step()
        if step in self.latest.all_steps():
            if best_step == self._readable_best_of(step):
                return
            self._delete(step)  # the steps before it still name a best on disk
        tree = _process_local(state_tree(model, optimizer))
        try:
            self.latest.save(step, args=ocp.args.Composite(
                model=ocp.args.StandardSave(tree["model"]), opt=ocp.args.StandardSave(tree["opt"]),
                meta=ocp.args.JsonSave(meta), best=ocp.args.JsonSave({"step": best_step})))
            self.latest.wait_until_finished()
        except Exception as error:  # noqa: BLE001 -- a full disk is the user's to fix: say where and how much
            if disk_full(error) is None:
                raise
            raise self._disk_full(step, tree) from error
        self._delete_old()

    def _disk_full(self, step: int, tree: dict) -> "DiskFull":
        """Remove the step's unfinished folder (the space it took) and say what a checkpoint needs.

        orbax's writer threads may still be failing on that folder: they are waited for first."""
        _join_orbax_threads()
        for unfinished in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(unfinished, ignore_errors=True)
        kept = self.latest_step()
        size = (_folder_bytes(self.directory / str(kept)) if kept is not None
                else sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))
        free = shutil.disk_usage(self.directory).free
        return DiskFull(f"no space left on device saving step {step} in {self.directory}: a checkpoint takes "
                        f"{_mib(size)} and {_mib(free)} are free; " + (
                            f"the previous step, {kept}, is intact" if kept is not None else "no step was saved")
                        + "; free space there (or move --workdir), then --resume")

    def restore_latest(self, model, optimizer) -> dict | None:
        """Restore the newest checkpoint that restores into model and optimiser; its meta, or None if
        there is none. A step that does not restore (a truncated file) is named in one warning and
        the one before it is used.

        Raises:
          CheckpointUnreadable: there are steps, and none restores.
        """
        steps = sorted(self.latest.all_steps(), reverse=True)
        meta = self._restore_first(steps, model, optimizer, "latest")
        if meta is not None and steps[0] != meta["step"]:
            self._set_aside([s for s in steps if s > meta["step"]])
        return meta

    def restore_best(self, model) -> dict | None:
        """Restore the best checkpoint's model state; its meta, or None if no step was saved as best.

        A best step that does not restore is named in one warning; then the best named before it is
        used, else the newest step that restores.

        Raises:
          CheckpointUnreadable: there are steps, and none restores.
        """
        bests = self._named_bests()
        if not bests:
            return None
        others = [s for s in sorted(self.latest.all_steps(), reverse=True) if s not in bests]
        return self._restore_first(bests + others, model, None, "best")

    def close(self) -> None:
        self.latest.close()

    def _best_of(self, step: int) -> int | None:
        return self.latest.restore(step, args=ocp.args.Composite(best=ocp.args.JsonRestore()))["best"]["step"]

    def _readable_best_of(self, step: int) -> int | None:
        try:
            return self._best_of(step)
        except Exception as error:  # noqa: BLE001 -- a damaged step: its pointer is passed over, named
            log.warning("checkpoint step %d in %s: its best-step pointer does not read (%s)", step,
                        self.directory, unreadable_reason(error))
            return None

    def _restore_first(self, steps: list[int], model, optimizer, what: str) -> dict | None:
        """Restore the first of ``steps`` that restores; each that does not is named in one line."""
        failed = []
        for step in steps:
            try:
                meta = self._restore(step, model, optimizer)
            except Exception as error:  # noqa: BLE001 -- any damage to a step's files: try the one before
                failed.append(f"step {step}: {unreadable_reason(error)}")
                log.warning("checkpoint step %d in %s does not restore (%s); trying the step before it",
                            step, self.directory, unreadable_reason(error))
                continue
            if failed:
                log.warning("restored step %d in %s as the %s checkpoint (%s did not restore)", step,
                            self.directory, what, ", ".join(f.split(":")[0] for f in failed))
            return meta
        if failed:
            raise CheckpointUnreadable(f"no checkpoint in {self.directory} restores ({'; '.join(failed)}); "
                                       "start another --workdir")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged steps into ``damaged/`` (a resume saves those steps again; the files stay to be
        looked at)."""
        aside = self.directory / DAMAGED
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / str(step)
            n = 1
            while target.exists():
                target, n = aside / f"{step}.{n}", n + 1
            (self.directory / str(step)).rename(target)
            log.warning("moved the damaged step %d to %s", step, target)
        self.latest.reload()

    def _delete_old(self) -> None:
        """Delete steps older than the newest ``keep``, except the bests these name (after the commit)."""
        steps = sorted(self.latest.all_steps(), reverse=True)
        kept = set(steps[:self.keep])
        kept |= {self._readable_best_of(s) for s in steps[:self.keep]}
        for step in steps:
            if step not in kept:
                self._delete(step)

    def _delete(self, step: int) -> None:
        self.latest.delete(step)  # a rename into DELETED
        self._purge_deleted()

    def _purge_deleted(self) -> None:
        if jax.process_index() == 0:
            shutil.rmtree(self.directory / DELETED, ignore_errors=True)

    def _restore(self, step: int, model, optimizer) -> dict:
        current = state_tree(model, optimizer)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _process_local(current))
        items = {name: ocp.args.StandardRestore(tree) for name, tree in target.items()}
        restored = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items))
        values = {name: restored[name] for name in target}
        if jax.process_count() > 1:  # numpy back onto each leaf's device
            values = jax.tree.map(_placed_like, values, {name: current[name] for name in target})
        load_state_tree(values, model, optimizer)
        return dict(restored["meta"])


def unreadable_reason(error: BaseException) -> str:
    """Why a step did not restore, short: tensorstore's last clause and the file it names (its message
    also carries a whole JSON spec)."""
    text = " ".join(str(error).split(" [tensorstore_spec")[0].split())
    files = re.findall(r'local file "([^"]+)"', text)
    reason = text.rsplit(": ", 1)[-1] or type(error).__name__
    return f"{files[-1]}: {reason}" if files else f"{type(error).__name__}: {reason}"[:300]


def _join_orbax_threads(timeout: float = 10.0) -> None:
    """Wait (bounded) for orbax's background threads: after a failed save its metadata writers still
    run, and one of them would recreate the unfinished folder after it is removed."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax"):
            try:
                thread.join(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 -- orbax's join re-raises the thread's error: the full disk
                pass


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _one_process(directory: Path) -> dict:
    """orbax options: this process's checkpoints; in a multi-process run only process 0 makes them,
    and orbax must not wait for the others (``active_processes``, which needs the folder made)."""
    if jax.process_count() == 1:
        return {"create": True}
    directory.mkdir(parents=True, exist_ok=True)
    return {"create": False, "multiprocessing_options": ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()})}


def _process_local(tree: dict) -> dict:
    """The tree as orbax may save it: in a multi-process run a single-device ``jax.Array`` is
    "host local" and refused (orbax wants global arrays), so its leaves go as numpy."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree)


def _placed_like(value, current):
    """A restored numpy leaf on the device (sharding) of the model's current leaf."""
    return jax.device_put(value, current.sharding) if isinstance(current, jax.Array) else value


def _key_to_data(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


def _data_to_key(template, value):
    if isinstance(template, jax.Array) and jax.dtypes.issubdtype(template.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(np.asarray(value), impl=jax.random.key_impl(template))
    return value


def _with_int_keys(tree, template):
    """orbax returns dict keys as strings; match the template's (int list indices in NNX paths)."""
    if not isinstance(template, dict):
        return tree
    by_str = {str(k): k for k in template}
    return {by_str.get(str(k), k): _with_int_keys(v, template.get(by_str.get(str(k), k)))
            for k, v in tree.items()}
