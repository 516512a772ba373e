"""orbax checkpoints of a training run: the latest (to resume) and the best by validation metric.

A checkpoint holds the whole NNX state of the model (parameters, BatchNorm statistics, RNG streams)
and of the optimiser (optax state, gradient accumulators), plus a JSON ``meta`` dict (the global
step, epoch, best metric so far). Saves are synchronous and atomic: orbax writes to a temporary
folder and renames it when complete, so a kill mid-save leaves the previous checkpoint intact.

Layout under the workdir::

    checkpoints/<step>/   latest (max_to_keep=2), written at every epoch end (and every N steps)
    best/<step>/          the model (no optimiser) with the best validation metric (max_to_keep=1)
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

__all__ = ["RunCheckpoints", "state_tree", "load_state_tree"]


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
    """The latest and the best checkpoints of one run's workdir.

    Args:
      workdir: the run's folder.
      keep: latest checkpoints kept (the newest ``keep`` steps).
    """

    def __init__(self, workdir: str | Path, keep: int = 2):
        root = Path(workdir).absolute()
        options = dict(create=True, enable_async_checkpointing=False)
        self.latest = ocp.CheckpointManager(
            root / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=keep, **options))
        self.best = ocp.CheckpointManager(
            root / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1, **options))

    def save(self, step: int, model, optimizer, meta: dict, *, best: bool = False) -> None:
        """Save model and optimiser to the latest checkpoints (and the model alone as the best)."""
        _save(self.latest, step, state_tree(model, optimizer), meta)
        if best:
            _save(self.best, step, state_tree(model), meta)

    def restore_latest(self, model, optimizer) -> dict | None:
        """Restore the newest checkpoint into model and optimiser; its meta, or None if there is none."""
        return _restore(self.latest, model, optimizer)

    def restore_best(self, model) -> dict | None:
        """Restore the best checkpoint's model state; its meta, or None if there is none."""
        return _restore(self.best, model, None)

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _save(manager: ocp.CheckpointManager, step: int, tree: dict, meta: dict) -> None:
    if manager.latest_step() == step:
        return  # already saved (a step checkpoint at the end of an epoch)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


def _restore(manager: ocp.CheckpointManager, model, optimizer) -> dict | None:
    step = manager.latest_step()
    if step is None:
        return None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_tree(model, optimizer))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    load_state_tree(restored["state"], model, optimizer)
    return dict(restored["meta"])


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
